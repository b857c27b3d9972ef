"""The speed-benchmark helpers that decide what a reported number means (run on CPU).

* bench/exact_baselines.classify_kernels: which SDPA backend a list of CUDA kernel names shows
  (cuDNN's names also contain "flash", so order matters);
* bench/fit_throughput: the fit command of every named run parses (LightningCLI ``--print_config``),
  bad run names are refused, and the throughput read from a metrics.csv equals a hand computation.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from bench import exact_baselines, fit_throughput

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("names", "backend"),
    [
        (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "elementwise_kernel"], "cudnn"),
        (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "gemm"], "flash"),
        (["fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "fmha_cutlassB_bf16"], "efficient"),
        (["ampere_bf16_s16816gemm_bf16_128x64", "softmax_warp_forward"], "math"),
    ],
)
def test_classify_kernels(names, backend):
    assert exact_baselines.classify_kernels(names) == backend


def test_unknown_run_name_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown run"):
        fit_throughput.command("exact-squashed", "cache", 10, 4096, 1, tmp_path, False)
    with pytest.raises(SystemExit, match="unknown run"):
        fit_throughput.command("mamba-padded", "cache", 10, 4096, 1, tmp_path, False)


def test_read_throughput_matches_hand_computation(tmp_path):
    run = tmp_path / "csv" / "version_0"
    run.mkdir(parents=True)
    rows = [  # step, tokens/s, tokens seen; the first window is dropped (warm-up)
        (25, 10.0, 1000.0),
        (50, 200.0, 3000.0),
        (75, 300.0, 5000.0),
        (100, 100.0, 7000.0),
    ]
    with (run / "metrics.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "train/loss", "perf/tokens_per_sec", "perf/tokens_seen", "perf/peak_memory_gb"])
        w.writerow([10, 2.0, "", "", ""])  # a loss-only row
        for step, rate, seen in rows:
            w.writerow([step, "", rate, seen, 1.5])
    got = fit_throughput.read_throughput(tmp_path)
    assert got["real_tokens_per_s"] == 200.0  # median of 200, 300, 100
    assert got["real_tokens_per_step"] == (7000 - 1000) / (100 - 25)
    assert got["steps_per_s"] == pytest.approx(200.0 / 80.0)
    assert got["windows"] == 3 and got["peak_memory_gb"] == 1.5


def test_too_few_windows_is_an_error(tmp_path):
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("step,perf/tokens_per_sec\n5,1.0\n")
    assert "error" in fit_throughput.read_throughput(tmp_path)


@pytest.mark.parametrize("run", ["exact-padded", "performer-padded", "performer-packed"])
def test_fit_commands_parse(tmp_path, run):
    cmd = fit_throughput.command(run, str(tmp_path / "cache"), 10, 4096, 1, tmp_path, True, log_every=5)
    proc = subprocess.run([*cmd, "--print_config"], capture_output=True, text=True, cwd=REPO, check=False,
                          env=fit_throughput.child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ThroughputMonitor" in proc.stdout and "bench.fit_throughput.StepProfiler" in proc.stdout
    assert ("mode: packed" if run.endswith("packed") else "mode: single") in proc.stdout
