"""The GPU path, checked end to end on a machine with a GPU; the last line is one JSON object.

Each check runs a job the way a lab member would (``python -m jobs.<name> --config ... overrides``, a local Ray
started by the job) and records its exit status, wall time and the figures its log prints:

- ``vatt-ddp`` / ``vatt-deepspeed`` / ``vatt-accelerate``: VATT tiny for one epoch on 1 GPU under each strategy
  with ``run.precision=bf16`` (DeepSpeed ZeRO-2);
- ``shared-gpu``: the shapes job with 2 workers on one GPU (``gpus_per_worker=0.5``: gloo, both on device 0);
- ``video-ssl``: the video SSL job at the papers' clip size (16 frames at 112x112, R3D-18) on 1 GPU from a
  synthetic .mp4 corpus: clips/s and the data-wait share of a step, with ``--loader-workers`` dataloader workers;
- ``nas-fractional``: a live NAS search with 4 trials sharing one GPU (``gpus_per_trial=0.25``, memory capped);
- ``vatt-base``: VATT Base as ``jobs/vatt/configs/base.yaml`` trains it (DeepSpeed ZeRO-1, bf16 autocast with fp32
  master weights, realignment and the curriculum) on 1 GPU from real shards on local disk (a synthetic corpus at
  Base's clip size, written first): samples/s, the data-wait share of a step, and MFU: the model's FLOPs per sample
  (forward and backward, DropToken's share of tokens, counted by torch's FlopCounterMode on the meta device) x
  samples/s / the device's dense bf16 peak (``--peak-tflops`` where the name is not in ``PEAK_BF16_TFLOPS``);
- ``gan-64``: the GAN job's 64x64 preset (``jobs/gan/configs/base64.yaml``, StyleGAN2 + ADA, fp32 with TF32) for
  8 epochs of its 2,000 images on 1 GPU: images/s (issue 14's GPU figure) and the data-wait share.

``--cpu`` runs the same checks with no GPU at CPU sizes (what the tests' machine can do: it proves the script,
not the GPU path; vatt-base then trains tiny's model and reports its MFU as skipped). ``--only NAME ...`` picks
checks. Estimated 8-12 minutes on one H200 (not yet run on one): on a first try, run ``--only vatt-base`` apart
(the issue's MFU and data-wait figures) within one call's 10 minutes, and the rest in a second call.

    python bench/gpu_check.py [--cpu] [--only vatt-base gan-64] [--loader-workers 8] [--peak-tflops 989.4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

CHECKS = ("vatt-ddp", "vatt-deepspeed", "vatt-accelerate", "vatt-base", "shared-gpu", "video-ssl", "nas-fractional", "gan-64")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the longest name found in
# torch.cuda.get_device_name() wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.05, "L40": 181.05, "L4": 121.0, "A10": 125.0, "A6000": 154.8, "RTX 4090": 165.2}


def vatt_base_config(cpu: bool) -> tuple[str, list[str]]:
    """The vatt-base check's preset and the overrides of its model and data (CPU: tiny's model, so the script runs)."""
    if cpu:
        return "jobs/vatt/configs/tiny.yaml", ["synthetic.num_samples=256", "synthetic.samples_per_shard=32", "data.batch_size=32", "epochs=2"]
    return "jobs/vatt/configs/base.yaml", ["synthetic.num_samples=384", "synthetic.samples_per_shard=32", "epochs=8"]


def vatt_flops_per_sample(config: str, overrides: list[str], batch: int = 2) -> float:
    """FLOPs of one training sample through VATT (forward and backward in train mode, so DropToken drops its share),
    counted on the meta device: no memory, no device, the same count as on a GPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from jobs.vatt.config import VattConfig
    from labtrain.config import load_config

    m = load_config(VattConfig, config, overrides).model
    from jobs.vatt.model import VattModel

    with torch.device("meta"):
        model = VattModel(m).train()
        video = torch.zeros(batch, 3, m.num_frames, m.frame_size, m.frame_size, dtype=torch.uint8)
        audio, text = torch.zeros(batch, m.audio_samples), torch.ones(batch, m.text_candidates, m.text_len, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            emb = model(video, audio, text)
            sum(t.float().sum() for t in vars(emb).values() if torch.is_tensor(t)).backward()
    return counter.get_total_flops() / batch


def peak_bf16_tflops(device_name: str) -> float | None:
    found = [name for name in PEAK_BF16_TFLOPS if name in device_name]
    return PEAK_BF16_TFLOPS[max(found, key=len)] if found else None


def commands(name: str, root: str, cpu: bool, loader_workers: int) -> list[str]:
    gpu = ["run.precision=bf16"] if cpu else ["run.gpus_per_worker=1", "run.precision=bf16"]  # CPU autocast runs bf16 too
    if name in ("vatt-ddp", "vatt-deepspeed", "vatt-accelerate"):
        strategy = name.split("-", 1)[1]
        return ["-m", "jobs.vatt", "--config", "jobs/vatt/configs/tiny.yaml", "synthetic.write=true", f"data.urls={root}/vatt/train/shard-{{000000..000007}}.tar",
                f"eval.urls={root}/vatt/eval/shard-{{000000..000001}}.tar", f"run.storage_path={root}/ckpt", f"out_dir={root}/vatt-out", f"run.name={name}",
                "run.num_workers=1", f"run.strategy={strategy}", "epochs=1", *gpu]
    if name == "vatt-base":
        config, size = vatt_base_config(cpu)
        device = ["run.cpus_per_worker=1", "run.gpus_per_worker=0", "data.num_workers=0", "run.strategy=deepspeed", "run.zero_stage=1", "run.precision=bf16"] if cpu else \
            [f"run.cpus_per_worker={loader_workers}", "run.gpus_per_worker=1", f"data.num_workers={loader_workers}", "run.precision=bf16"]
        return ["-m", "jobs.vatt", "--config", config, "synthetic.write=true", f"data.urls={root}/vatt-base/train/shard-{{000000..000{7 if cpu else 11:03d}}}.tar",
                f"eval.urls={root}/vatt-base/eval/shard-{{000000..000001}}.tar", "eval.num_samples=64", "eval.batch_size=32", "eval.probe_steps=20",
                f"run.storage_path={root}/ckpt", f"out_dir={root}/vatt-base-out", "run.name=vatt-base", "run.num_workers=1", "run.log_every=5", *size, *device]
    if name == "shared-gpu":
        share = [] if cpu else ["run.gpus_per_worker=0.5"]
        return ["-m", "jobs.shapes", "--config", "jobs/shapes/configs/demo.yaml", "synthetic.write=true", f"data.urls={root}/shapes/shard-{{000000..000007}}.tar",
                f"run.storage_path={root}/ckpt", "run.name=shared-gpu", "run.num_workers=2", "epochs=1", *share]
    if name == "video-ssl":
        size = ["sampling.num_frames=4", "sampling.crop_size=28", "synthetic.frame_size=32", "synthetic.num_frames=32", "model.stem_width=16",
                "model.widths=[16, 32]", "model.blocks=[1, 1]", "model.stem_stride=1", "model.groups=8", "objective.stages=[2]",
                "data.batch_size=8"] if cpu else ["synthetic.frame_size=128", "synthetic.num_frames=64", "data.batch_size=32"]
        return ["-m", "jobs.video_ssl", "--config", "jobs/video_ssl/configs/base.yaml", "synthetic.write=true", "synthetic.num_videos=512", "synthetic.eval_videos=64",
                "synthetic.samples_per_shard=64", f"data.urls={root}/video/train/shard-{{000000..000007}}.tar", f"eval.urls={root}/video/eval/shard-{{000000..000000}}.tar",
                f"run.storage_path={root}/ckpt", f"out_dir={root}/video-out", "run.name=video-ssl", "run.num_workers=1", f"data.num_workers={loader_workers}",
                f"run.cpus_per_worker={1 if cpu else loader_workers}", f"run.gpus_per_worker={0 if cpu else 1}",
                "objective.queue_size=256", "epochs=1", "eval.finetune_epochs=0", "sampling.eval_clips=2", "eval.probe_steps=20", *size, *(["run.precision=fp32"] if cpu else [])]
    if name == "nas-fractional":
        share = ["trials.gpus_per_trial=0"] if cpu else ["trials.gpus_per_trial=0.25"]
        return ["-m", "jobs.nas", "--config", "jobs/nas/configs/nb201_live.yaml", "evaluator.input.write_synthetic=true", f"output={root}/nas",
                "search.methods=[random]", "search.budget=8", "trials.max_concurrent=4", *share]
    if name == "gan-64":
        size = ["images.resolution=16", "model.z_dim=64", "model.w_dim=64", "model.g_channels=64", "model.d_channels=64", "model.min_channels=16",
                "corpus.num_images=64", "corpus.eval_images=128", "eval.num_generated=64", "eval.extractor_steps=20", "eval.kid_subset_size=32",
                "data.batch_size=16", "data.num_workers=0", "run.gpus_per_worker=0", "run.cpus_per_worker=1", "epochs=2"] if cpu else ["epochs=8", "eval.num_generated=2000"]
        return ["-m", "jobs.gan", "--config", "jobs/gan/configs/base64.yaml", "corpus.write=true", f"data.urls={root}/gan/train/shard-{{000000..{19 if not cpu else 0:06d}}}.tar",
                f"eval.urls={root}/gan/eval/shard-{{000000..{19 if not cpu else 1:06d}}}.tar", f"run.storage_path={root}/ckpt", f"out_dir={root}/gan-out",
                "run.name=gan-64", *size]
    raise ValueError(name)


def figures(name: str, log: str) -> dict:
    out: dict = {}
    progress = re.findall(r"step (\d+)/(\d+) .*?\| ([\d.]+) samples/s .*?data wait (\d+)%", log)
    if progress:
        rates = [float(p[2]) for p in progress[1:]] or [float(progress[0][2])]
        out["samples_per_s"] = round(sum(rates) / len(rates), 1)
        out["data_wait_share"] = round(sum(int(p[3]) for p in progress[1:] or progress) / len(progress[1:] or progress) / 100, 3)
        out["steps"] = int(progress[-1][0])
    if name == "gan-64" and "samples_per_s" in out:
        out["images_per_s"] = out["samples_per_s"]
    if name == "video-ssl" and "samples_per_s" in out:
        out["clips_per_s"] = round(2 * out["samples_per_s"], 1)  # a sample is a slow and a fast clip
    match = re.search(r"(\w+): (\d+) done, (\d+) failed", log)
    if match:
        out["trials_done"], out["trials_failed"] = int(match[2]), int(match[3])
    return out


def mfu_figures(flops_per_sample: float, samples_per_s: float, peak_tflops: float | None) -> dict:
    """Model FLOPs utilisation: the model's FLOPs at the measured rate over the device's dense bf16 peak (1 GPU)."""
    achieved = flops_per_sample * samples_per_s / 1e12
    out = {"model_gflop_per_sample": round(flops_per_sample / 1e9, 3), "model_tflops_per_s": round(achieved, 2), "mfu": None}
    if peak_tflops:
        out["mfu"] = round(achieved / peak_tflops, 3)
    else:
        out["mfu_skipped"] = "no bf16 peak for this device (CPU, or a GPU PEAK_BF16_TFLOPS does not name: pass --peak-tflops)"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU: the same checks at CPU sizes (checks the script itself)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--loader-workers", type=int, default=8, help="dataloader workers of the video SSL check")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per check")
    parser.add_argument("--vatt-base-timeout", type=float, default=480, help="seconds of the vatt-base check (it writes Base-sized clips first)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, where PEAK_BF16_TFLOPS does not name it")
    args = parser.parse_args(argv)
    device_name, peak = "cpu", None
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here; run with --cpu to check the script itself", file=sys.stderr)
            return 2
        device_name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or peak_bf16_tflops(device_name)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as root:
        env = {**os.environ, "LABTRAIN_STORAGE_ROOT": root, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
        for name in args.only:
            start = time.perf_counter()
            try:
                timeout = args.vatt_base_timeout if name == "vatt-base" else args.timeout
                proc = subprocess.run([sys.executable, *commands(name, root, args.cpu, args.loader_workers)], env=env, capture_output=True, text=True, timeout=timeout)
                rc, log = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as expired:
                rc, log = 124, (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
            seconds = round(time.perf_counter() - start, 1)
            results[name] = {"ok": rc == 0, "rc": rc, "seconds": seconds, **figures(name, log)}
            if name == "vatt-base" and "samples_per_s" in results[name]:
                results[name].update(mfu_figures(vatt_flops_per_sample(*vatt_base_config(args.cpu)), results[name]["samples_per_s"], peak))
            if rc != 0:
                lines = [line for line in log.splitlines() if "writing shards" not in line and line.strip()]  # no progress bars
                results[name]["tail"] = "\n".join(lines[-25:])[-3000:]
            print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds} s {json.dumps({k: v for k, v in results[name].items() if k not in ('tail',)})}", flush=True)
    print(json.dumps({"device": "cpu" if args.cpu else "cuda", "device_name": device_name, "peak_bf16_tflops": peak, "loader_workers": args.loader_workers, "checks": results}))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
