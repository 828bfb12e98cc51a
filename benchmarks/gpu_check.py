"""GPU check: kernels, speculative decoding and training on CUDA, in one prepared run that fits the device budget.

    bash benchmarks/gpu_check.sh                       # on the lent GPU machine: results go to $OUT (< 8 minutes)
    python benchmarks/gpu_check.py --smoke --out DIR   # CPU, tiny shapes, Triton interpreter (CI runs this)

Four parts, each guarded: a failure or a timeout is recorded (with the last lines of its output) and the next part
runs; `gpu_check.json` and `gpu_check.md` are rewritten after every part, so a run killed at any point keeps what
it measured. A part's time is capped (`--budget` seconds in all, split below) so the whole run stays inside one
device command.

  kernel_tests  `LEANLM_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/test_kernels.py` (fp32, fp16, bf16 native)
  kernels       `benchmarks/kernels.py` reduced to what fits: ASA local/global and NSA layers fwd+bwd at 8k/32k/64k
                against SDPA's FlashAttention backend (and fla's `parallel_nsa` if it imports), decode at 64k/128k,
                B 1 and 8, against the copy bandwidth measured in the same run
  speculative   a SmolLM2-135M-shaped Llama with random weights (no weights travel to the GPU machine), its LM head
                scaled so that top-2 logit ties are rare: greedy chain / EAGLE-2 / C2T output against plain greedy,
                with an untrained EAGLE head and with the target drafting for itself (deep acceptance); per-step
                costs (verify over 1..128 tree nodes, one draft layer of 10 nodes); HF `generate` and leanlm plain
                decoding tokens/s; and *predicted* tokens/s for each strategy from the tau measured on CPU with the
                committed head (docs/results/speculative-sets.json, GSM8K):
                    tokens/s = (tau + 1) / (L * t_draft_layer + t_verify(n))
                with n the CPU run's candidates per step and L its draft layers per step (CPU draft ms per step /
                CPU draft ms per layer); t_verify interpolated between measured sizes
  training      `benchmarks/train_throughput.py --config 125m` under bf16 autocast: tokens/s and MFU of leanlm and of
                transformers' LlamaForCausalLM with the same shapes and weights

Nothing here reports a number it did not measure in this run, except the CPU tau values it names as inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds per part on the GPU (they sum to the default budget of 450 s, leaving room for start-up and transfers).
GPU_CAPS = {"kernel_tests": 150, "kernels": 140, "speculative": 100, "training": 60}
SMOKE_CAPS = {"kernel_tests": 240, "kernels": 300, "speculative": 240, "training": 120}


def env_for_children(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")] +
                                        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["LEANLM_TEST_DEVICE"] = device
    env["TRITON_INTERPRET"] = "0" if device == "cuda" else "1"
    return env


def run_child(cmd: list[str], timeout: float, env: dict[str, str], log: Path) -> dict:
    """Run `cmd` with a timeout; its output goes to `log`. Returns status, seconds and the output's tail."""
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:.0f}s"
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return {"status": status, "seconds": time.perf_counter() - t, "tail": tail}


# --------------------------------------------------------------------------------------------------- parts
def part_kernel_tests(args, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "-rfE",
           f"--junitxml={out / 'kernel_tests.xml'}"]
    if args.smoke:
        cmd += ["-k", "test_window_kernel_matches_reference and dtype0"]  # the plumbing only (CI runs the file)
    res = run_child(cmd, timeout, env_for_children(args.device), out / "kernel_tests.log")
    summary = next((ln for ln in reversed(res["tail"]) if " passed" in ln or " failed" in ln or " error" in ln), "")
    res["summary"] = summary.strip("= ")
    return res


def part_kernels(args, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "benchmarks/kernels.py", "--out", str(out / "kernels")]
    if args.smoke:
        cmd += ["--smoke"]
    else:
        cmd += ["--lengths", "8192,32768,65536", "--decode-lengths", "65536,131072", "--decode-batch", "1,8",
                "--reps", "5"]
    res = run_child(cmd, timeout, env_for_children(args.device), out / "kernels.log")
    result = out / "kernels" / "kernels.json"
    if result.exists():
        res["result"] = json.loads(result.read_text())
    return res


def part_training(args, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "benchmarks/train_throughput.py", "--out", str(out / "training")]
    if args.smoke:
        cmd += ["--config", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--rounds", "2",
                "--steps-per-round", "1", "--warmup", "1"]
    else:
        cmd += ["--config", "125m", "--device", "cuda", "--batch-size", "16", "--seq-len", "1024", "--rounds", "5",
                "--steps-per-round", "2", "--warmup", "3"]
    res = run_child(cmd, timeout, env_for_children(args.device), out / "training.log")
    found = sorted((out / "training").glob("training-*.json"))
    if found:
        res["result"] = json.loads(found[-1].read_text())
    return res


def part_speculative(args, out: Path, timeout: float) -> dict:
    """In this process (so a CUDA error is caught here), bounded by `timeout` between measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanlm.speculative.c2t import C2T, C2TClassifier
    from leanlm.speculative.cost import draft_layer_seconds, verify_seconds
    from leanlm.speculative.draft import EagleDraftHead, ModelDrafter, head_config
    from leanlm.speculative.engine import SpeculativeDecoder, plain_generate
    from leanlm.speculative.target import make_target
    from leanlm.speculative.strategies import make_strategy

    deadline = time.perf_counter() + timeout
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if (dev.type == "cuda" and not args.fp32) else torch.float32
    if args.smoke:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
        n_prompts, prompt_len, new_tokens, sizes, context = 2, 16, 12, [1, 2, 4, 8], 32
    else:  # SmolLM2-135M-Instruct's shapes
        shape = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3)
        n_prompts, prompt_len, new_tokens, sizes, context = 4, 128, 64, [1, 2, 4, 8, 16, 32, 64, 128], 256
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.logit_scale)  # spread the logits: random weights give near-uniform ones
    model = model.to(dev, dtype)
    head = EagleDraftHead(head_config(model.config)).to(dev, dtype).eval()
    classifier, _ = C2TClassifier.load(ROOT / "assets" / "c2t-smollm2")
    strategies = {"chain": make_strategy("chain"), "eagle2": make_strategy("eagle2"),
                  "c2t": C2T(classifier, beta=0.5, top_k=10, max_depth=8)}
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=gen) for _ in range(n_prompts)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    result: dict = {"model": {**shape, "dtype": str(dtype).replace("torch.", ""), "logit_scale": args.logit_scale},
                    "identical": {}, "first_divergence": [], "stats": {}}
    target = make_target(model)
    plain_times, refs = [], []
    for ids in prompts:
        sync()
        t = time.perf_counter()
        ref, _ = plain_generate(target, ids, new_tokens)
        sync()
        plain_times.append(time.perf_counter() - t)
        refs.append(ref)
    result["plain_tokens_per_s"] = sum(len(r) for r in refs) / sum(plain_times)
    for name, strategy in strategies.items():
        for drafter in ("head", "self"):
            if time.perf_counter() > deadline:
                result["stopped_early"] = f"time cap reached before {name}/{drafter}"
                break
            key = f"{name}/{drafter}"
            same, taus = 0, []
            for ids, ref in zip(prompts, refs):
                # "self": the target drafting for itself, so acceptance goes deep (limited only by numerics)
                factory = (lambda ids=ids: ModelDrafter(model, first=int(ids[0, 0]))) if drafter == "self" else None
                dec = SpeculativeDecoder(target, head, strategy, drafter_factory=factory)
                got, st = dec.generate(ids, new_tokens)
                taus.append(st.tau)
                if got == ref:
                    same += 1
                else:  # a bug, or a near-tie resolved differently by two kernels: the logit gap tells which
                    i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
                    seq = torch.tensor([ids[0].tolist() + ref[:i]], device=dev)
                    with torch.no_grad():
                        top2 = model(seq, use_cache=False).logits[0, -1].float().topk(2).values
                    result["first_divergence"].append({"run": key, "index": i, "top2_logit_gap": float(top2[0] - top2[1])})
            result["identical"][key] = f"{same}/{len(prompts)}"
            result["stats"][key] = {"tau": statistics.mean(taus)}

    if time.perf_counter() < deadline:
        verify = verify_seconds(target, sizes, context=context, repeats=3 if args.smoke else 5)
        result["verify_ms"] = {n: 1000 * s for n, s in verify.items()}
        result["draft_layer_ms"] = 1000 * draft_layer_seconds(head, target, width=10, context=context,
                                                              repeats=3 if args.smoke else 5)
        result["predicted"] = predict(result["verify_ms"], result["draft_layer_ms"])
    if time.perf_counter() < deadline and not args.smoke:  # compiled steps (CUDA graphs on a GPU)
        compiled = make_target(model, compile=True)
        result["verify_ms_compiled"] = {n: 1000 * s for n, s in verify_seconds(
            compiled, [n for n in sizes if n <= 64], context=context, repeats=5).items()}
        result["compile_seconds"] = compiled.compile_stats.seconds
    if time.perf_counter() < deadline:
        ids = prompts[0].to(dev)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            sync()
            t = time.perf_counter()
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False)
            sync()
        result["hf_generate_tokens_per_s"] = (hf.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
    return {"status": "ok", "result": result}


def predict(verify_ms: dict[int, float], draft_layer_ms: float) -> list[dict]:
    """Predicted tokens/s per strategy from the CPU-measured tau (see the module docstring for the formula)."""
    cpu = json.loads((ROOT / "docs" / "results" / "speculative-sets.json").read_text())
    cpu_layer_ms = 1000 * json.loads((ROOT / "docs" / "results" / "c2t.json").read_text())["costs"][
        "draft_layer_seconds"]
    sizes = sorted(verify_ms)

    def t_verify(n: float) -> float:
        lo = max([s for s in sizes if s <= n], default=sizes[0])
        hi = min([s for s in sizes if s >= n], default=sizes[-1])
        if hi == lo:
            return verify_ms[lo]
        return verify_ms[lo] + (verify_ms[hi] - verify_ms[lo]) * (n - lo) / (hi - lo)

    rows = [{"strategy": "plain", "cpu_tau": 0.0, "predicted_tokens_per_s": 1000 / verify_ms[sizes[0]]}]
    for r in cpu["rows"]:
        if r.get("prompts") != "gsm8k" or r.get("strategy") == "none":
            continue
        layers = r["draft_ms_per_step"] / cpu_layer_ms
        step_ms = layers * draft_layer_ms + t_verify(r["candidates_per_step"])
        rows.append({"strategy": r.get("describe", r["strategy"]), "cpu_tau": r["tau"],
                     "candidates": r["candidates_per_step"], "draft_layers": layers, "step_ms": step_ms,
                     "predicted_tokens_per_s": 1000 * (r["tau"] + 1) / step_ms})
    return rows


# ------------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['machine']['device']})", "",
             f"torch {report['machine'].get('torch')}, transformers {report['machine'].get('transformers')}, "
             f"triton {report['machine'].get('triton')}; {'smoke run (CPU)' if report['smoke'] else 'full run'}; "
             f"{report['started']}", "", "| part | status | seconds | summary |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        summary = part.get("summary") or (part.get("error", "") or "")[:120]
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.0f} | {summary} |")
    spec = report["parts"].get("speculative", {}).get("result")
    if spec:
        lines += ["", "## Speculative decoding (random-weight SmolLM2-shaped model)", "",
                  "| run | identical to plain greedy | tau |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {spec['stats'][k]['tau']:.2f} |" for k, v in spec["identical"].items()]
        lines += ["", f"plain decoding {spec['plain_tokens_per_s']:.1f} tokens/s; HF generate "
                  f"{spec.get('hf_generate_tokens_per_s', float('nan')):.1f} tokens/s"]
        if "verify_ms" in spec:
            lines += ["", "| tree nodes | verify ms |", "|---|---|"]
            lines += [f"| {n} | {ms:.2f} |" for n, ms in spec["verify_ms"].items()]
            lines += ["", f"one draft layer (10 nodes): {spec['draft_layer_ms']:.2f} ms", "",
                      "**Predicted** tokens/s (CPU tau with the committed head, GSM8K; formula in the script):", "",
                      "| strategy | CPU tau | candidates | draft layers | predicted step ms | predicted tokens/s |",
                      "|---|---|---|---|---|---|"]
            for r in spec["predicted"]:
                lines.append(f"| {r['strategy']} | {r['cpu_tau']:.2f} | {r.get('candidates', 1):.1f} | "
                             f"{r.get('draft_layers', 0):.1f} | {r.get('step_ms', 0):.2f} | "
                             f"{r['predicted_tokens_per_s']:.1f} |")
    train = report["parts"].get("training", {}).get("result")
    if train:
        lines += ["", "## Training throughput", "", "| model | tokens/s | MFU |", "|---|---|---|"]
        for name, m in train["models"].items():
            lines.append(f"| {name} | {m['tokens_per_s']:,.0f} | {m.get('mfu', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "device": device}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
    except Exception as exc:  # noqa: BLE001
        info["torch"] = f"unavailable ({exc})"
    for mod in ("transformers", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"unavailable ({type(exc).__name__})"
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--budget", type=float, default=sum(GPU_CAPS.values()), help="seconds for all parts")
    ap.add_argument("--parts", default="kernel_tests,kernels,speculative,training")
    ap.add_argument("--logit-scale", type=float, default=8.0, help="LM-head scale of the random target")
    ap.add_argument("--fp32", action="store_true", help="speculative part in fp32 instead of bf16")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    caps = SMOKE_CAPS if args.smoke else GPU_CAPS
    scale = args.budget / sum(GPU_CAPS.values()) if not args.smoke else 1.0
    report = {"machine": machine(args.device), "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "parts": {}}
    funcs = {"kernel_tests": part_kernel_tests, "kernels": part_kernels, "speculative": part_speculative,
             "training": part_training}
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        t = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            part = funcs[name](args, out, caps[name] * scale)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not lose the others
            part = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc().splitlines()[-12:]}
        part.setdefault("seconds", time.perf_counter() - t)
        report["parts"][name] = part
        print(f"[gpu_check] {name}: {part['status']} ({part['seconds']:.0f}s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
    failed = [n for n, p in report["parts"].items() if p["status"] != "ok"]
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and gpu_check.md; "
          f"{'all parts ok' if not failed else 'not ok: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
