"""Start a campaign of ``bench/experiments/speedrun.py`` runs as detached processes, and report on them.

Why detached: a device call is limited in time but a process in its own session keeps running
between calls while the machine is held, so this script starts every run and returns at once;
later calls poll with ``--status``. Nothing here waits.

The campaign file (YAML or JSON)::

    minutes: 25                       # budget of every run (a run may set its own)
    ood: /data/cath_s40_lt50id.fasta.gz
    eval_every: 200
    args: [--data.data_dir, /data/cache, --data.num_workers, "3"]   # for every run
    runs:
      performer:
        config: configs/protein_bid_performer_softmax.yaml          # or a list of configs
        overrides: [--model.lr, "1e-3"]
      exact:
        config: [configs/protein_bid_exact.yaml]

    python -m bench.experiments.speedrun_campaign CAMPAIGN.yaml --out DIR [--only performer,exact]
    python -m bench.experiments.speedrun_campaign --out DIR --status
    python -m bench.experiments.speedrun_campaign --out DIR --stop [--only NAME]

Per run ``NAME`` in ``DIR``: ``NAME.json`` (the rows), ``NAME.log`` (stdout + stderr), ``NAME.pid``
(the process id, which is also its session and process-group id) and ``NAME_run/`` (checkpoints,
CSV). Runs started together share the GPU: their minutes are shared-GPU minutes, comparable with
each other only when the same number of runs ran side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from protein_lm.errors import UserError
from protein_lm.io import write_text

PROG = "python -m bench.experiments.speedrun_campaign"
REPO = Path(__file__).resolve().parents[2]
SPEEDRUN = "bench.experiments.speedrun"


def load_campaign(path: str) -> dict[str, Any]:
    """The campaign file, checked: every run has a config; names are safe file names."""
    import yaml

    try:
        campaign = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: {err}") from None
    if not isinstance(campaign, dict) or not isinstance(campaign.get("runs"), dict) or not campaign["runs"]:
        raise UserError(f"{path}: needs a 'runs:' mapping of name -> {{config, overrides}}")
    for name, spec in campaign["runs"].items():
        if not str(name).replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"{path}: run name {name!r}: use letters, digits, '-', '_' and '.' only")
        if not isinstance(spec, dict) or not spec.get("config"):
            raise UserError(f"{path}: run {name!r} needs a config")
    for key in ("minutes", "ood"):
        missing = [n for n, spec in campaign["runs"].items() if spec.get(key, campaign.get(key)) is None]
        if missing:
            raise UserError(f"{path}: no {key!r} for run(s) {', '.join(map(str, missing))}")
    return campaign


def run_command(name: str, spec: dict[str, Any], campaign: dict[str, Any], out: Path) -> list[str]:
    """The speedrun.py command line of one run."""
    configs = spec["config"] if isinstance(spec["config"], list) else [spec["config"]]
    cmd = [sys.executable, "-m", SPEEDRUN]
    for config in configs:
        cmd += ["--config", str(config)]
    cmd += ["--minutes", str(spec.get("minutes", campaign.get("minutes"))),
            "--ood", str(spec.get("ood", campaign.get("ood"))),
            "--eval-every", str(spec.get("eval_every", campaign.get("eval_every", 200))),
            "--json", str(out / f"{name}.json")]
    return [*cmd, *map(str, campaign.get("args") or []), *map(str, spec.get("overrides") or [])]


def _child_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH: runs start in the caller's directory
    (relative configs and outputs keep their meaning) and still import ``bench`` and this
    checkout's ``protein_lm``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, finished but not yet reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def read_pid(out: Path, name: str) -> int | None:
    try:
        return int((out / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def start(campaign: dict[str, Any], out: Path, only: list[str] | None) -> list[tuple[str, int]]:
    """Start the chosen runs detached (own session, log file, pid file); returns (name, pid)."""
    names = list(campaign["runs"]) if not only else only
    unknown = [n for n in names if n not in campaign["runs"]]
    if unknown:
        raise UserError(f"--only: no run named {', '.join(unknown)} in the campaign")
    running = [n for n in names if (pid := read_pid(out, n)) is not None and alive(pid)]
    if running:
        raise UserError(f"already running: {', '.join(running)} (see --status; --stop to end them)")
    out.mkdir(parents=True, exist_ok=True)
    started = []
    for name in names:
        cmd = run_command(name, campaign["runs"][name], campaign, out)
        (out / f"{name}.cmd.json").write_text(json.dumps(cmd) + "\n")
        with open(out / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=_child_env())
        write_text(out / f"{name}.pid", f"{proc.pid}\n")
        started.append((name, proc.pid))
    return started


def run_names(out: Path) -> list[str]:
    return sorted(p.stem for p in out.glob("*.pid"))


def status(out: Path) -> list[dict[str, Any]]:
    """Per run: alive, and the last row's step / minutes / perplexities (None before the first row)."""
    report = []
    for name in run_names(out):
        pid = read_pid(out, name)
        entry: dict[str, Any] = {"run": name, "pid": pid, "alive": pid is not None and alive(pid),
                                 "rows": 0, "step": None, "minutes": None, "test_ppl": None, "ood_ppl": None,
                                 "minutes_to_target": None}
        try:
            doc = json.loads((out / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            doc = None
        if doc and doc.get("rows"):
            last = doc["rows"][-1]
            entry.update(rows=len(doc["rows"]), step=last["step"], minutes=last["train_seconds"] / 60,
                         test_ppl=last["test_ppl"], ood_ppl=last["ood_ppl"],
                         minutes_to_target=doc["summary"].get("minutes_to_target"))
        if not entry["alive"]:
            lines = (out / f"{name}.log").read_text(errors="replace").strip().splitlines() \
                if (out / f"{name}.log").exists() else []
            entry["log_tail"] = lines[-1] if lines else ""
        report.append(entry)
    return report


def status_table(report: list[dict[str, Any]]) -> str:
    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| run | alive | rows | step | minutes | test ppl | OOD ppl | min to target |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in report:
        lines.append(f"| {e['run']} | {'yes' if e['alive'] else 'no'} | {e['rows']} | {f(e['step'], 'd')} "
                     f"| {f(e['minutes'], '.2f')} | {f(e['test_ppl'], '.3f')} | {f(e['ood_ppl'], '.3f')} "
                     f"| {f(e['minutes_to_target'], '.2f')} |")
    ended = [f"{e['run']}: {e['log_tail']}" for e in report if not e["alive"] and e.get("log_tail")]
    return "\n".join(lines + (["", "last log line of ended runs:", *ended] if ended else []))


def stop(out: Path, only: list[str] | None) -> list[str]:
    """SIGTERM the process group of each chosen run that is alive; returns the names signalled."""
    stopped = []
    for name in only or run_names(out):
        pid = read_pid(out, name)
        if pid is not None and alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)  # the run is its session's leader: pgid == pid
                stopped.append(name)
            except ProcessLookupError:
                pass
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("campaign", nargs="?", help="campaign YAML/JSON (to start runs)")
    parser.add_argument("--out", required=True, help="directory of the runs' JSON, logs and pid files")
    parser.add_argument("--only", default=None, help="comma-separated run names (start or stop only these)")
    parser.add_argument("--status", action="store_true", help="print each run's last row and whether it is alive")
    parser.add_argument("--stop", action="store_true", help="send SIGTERM to the runs still alive")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()  # the runs write there whatever their working directory
    only = [n for n in args.only.split(",") if n] if args.only else None
    try:
        if args.status:
            print(status_table(status(out)))
        elif args.stop:
            print("stopped: " + (", ".join(stop(out, only)) or "nothing was running"))
        elif args.campaign:
            for name, pid in start(load_campaign(args.campaign), out, only):
                print(f"started {name}: pid {pid}, log {out / (name + '.log')}")
        else:
            raise UserError("give a campaign file to start runs, or --status / --stop")
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
