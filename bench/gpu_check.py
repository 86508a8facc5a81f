"""Does muscle-ray's training and scoring arithmetic run on this accelerator? One self-contained file.

Needs only torch, transformers and peft (no Ray, no muscle_ray: a bare GPU machine can run it as it
is). On a randomly initialised Llama (default ~0.8B parameters: hidden 2048, 16 layers, GQA 32/4
heads, intermediate 5632, vocab 32000; `--size tiny` for a CPU smoke run) it checks:

  task    one task-adapter step: LoRA (peft, all linear layers, fp32) on a frozen bf16 base,
          cross-entropy, bf16 autocast, activation checkpointing, AdamW
  compat  one compatibility step: the same student, a frozen v1 teacher (another base) and the v2
          teacher (the student's base with the adapter disabled), the MUSCLE masked KL at T = 2:
          per token KL(teacher || student) from v1 where the student's argmax is wrong, else from v2
  fsdp    the compat step with the student under FSDP2 `fully_shard` (per decoder block, then the
          root; MixedPrecisionPolicy param bf16 / reduce fp32) on a world-size-1 process group
          (NCCL on CUDA, gloo on CPU)
  scoring log-likelihood multiple choice of the same base on the device in bf16 vs on the CPU in
          fp32 (with --size tiny on a CPU: fp32 vs bf16, both on the CPU): prediction agreement

Each check prints one JSON line (median step seconds after warmup, peak memory: the CUDA
allocator's peak on a GPU, the process's peak RSS on a CPU), then a readable summary. Exit code 1
when a check fails: a non-finite loss, an exception (FSDP, ...), or agreement below --min-agreement.

    python bench/gpu_check.py                      # on the GPU machine
    python bench/gpu_check.py --size tiny --steps 2 --out check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import socket
import statistics
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F

FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
SIZES = {"1b": (2048, 16, 32, 4, 5632), "tiny": (64, 2, 4, 2, 128)}  # GQA: 32 query heads share 4 KV heads
VOCAB = {"1b": 32000, "tiny": 256}
SHAPES = {"1b": dict(batch=4, seq=512), "tiny": dict(batch=2, seq=32)}  # micro-batch, tokens per sequence
TEMPERATURE = 2.0


def llama(size: str, seed: int, device: torch.device):
    """A random Llama built directly on `device` in fp32 (same seed and device: same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(zip(FIELDS, SIZES[size]), vocab_size=VOCAB[size])
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(cfg).float()


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def student_of(base):
    """Frozen bf16 base + a trainable fp32 LoRA on every linear layer, with activation checkpointing."""
    from peft import LoraConfig, get_peft_model

    base = frozen(base.to(torch.bfloat16))
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def muscle_kl(student, old, new, labels, temperature: float = TEMPERATURE):
    """Mean over tokens of KL(p_teacher || p_student) at T, teacher v1 where the student's argmax
    misses the label and v2 where it hits (the paper's Eq. 1 mask); also the share sent to v1."""
    s = student.float()
    wrong = s.argmax(-1) != labels
    s_lp = F.log_softmax(s / temperature, -1)

    def kl(teacher):
        t_lp = F.log_softmax(teacher.float() / temperature, -1)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)

    return torch.where(wrong, kl(old), kl(new)).mean(), float(wrong.float().mean())


def task_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)), {}


@contextlib.contextmanager
def adapter_off(model):
    """The student's base alone, leaving every requires_grad flag as it is. PEFT's
    `disable_adapter` freezes the LoRA weights meanwhile: when that is the first forward under
    FSDP2, its lazy init sees no trainable parameter, keeps no fp32 reduce dtype, and the
    backward fails assigning bf16 gradients to fp32 LoRA weights (muscle-ray's `active_adapter`
    switches adapters the same flag-only way)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m in layers:
            m._disable_adapters = False


def compat_loss(model, teacher_v1, ids):
    with torch.no_grad():
        old = teacher_v1(input_ids=ids).logits[:, :-1]
        with adapter_off(model):  # v2 teacher: the student's own base
            new = model(input_ids=ids).logits[:, :-1]
    loss, share_v1 = muscle_kl(model(input_ids=ids).logits[:, :-1], old, new, ids[:, 1:])
    return loss, {"share_v1": round(share_v1, 4)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_bytes(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "cuda_max_memory_allocated", torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return "peak_rss", kb * 1024
    except (OSError, StopIteration):
        return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_steps(name, model, loss_fn, ids, args, device) -> dict:
    """`warmup + steps` optimizer steps; the median time of the last `steps`, the peak memory."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak(device)
    times, losses, extra = [], [], {}
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, extra = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    kind, peak = peak_bytes(device)
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    return {
        "check": name,
        "ok": finite,
        **({} if finite else {"error": f"non-finite loss: {losses}"}),
        "losses": [round(v, 5) for v in losses],
        "step_s_median": round(statistics.median(times), 4),
        "tokens_per_s": round(ids.numel() / statistics.median(times), 1),
        kind: peak,
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_check(args, device, teacher_v1, ids) -> dict:
    """The compat step with the student under FSDP2 on a one-process group."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    try:
        model = student_of(llama(args.size, 0, device))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        out = train_steps("fsdp", model, partial(compat_loss, model, teacher_v1), ids, args, device)
        return {**out, "backend": backend}
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def mc_scores(model, ids: torch.Tensor, ctx_len: int, n_choices: int, batch: int = 32) -> torch.Tensor:
    """(items, choices) log-likelihood of each choice's tokens given the shared context."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(ids), batch):
        x = ids[start : start + batch].to(device)
        lp = F.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        tok = lp.gather(-1, x[:, 1:, None]).squeeze(-1)
        out.append(tok[:, ctx_len - 1 :].sum(-1).cpu())
    return torch.cat(out).view(-1, n_choices)


def scoring_check(args, base_fp32, device) -> dict:
    """Same weights: the device copy in bf16 vs a CPU copy in fp32 (tiny on CPU: bf16 vs fp32)."""
    vocab, ctx_len, choice_len, n_choices = VOCAB[args.size], 24, 8, 4
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, vocab, (args.items, 1, ctx_len), generator=g).expand(-1, n_choices, -1)
    choices = torch.randint(0, vocab, (args.items, n_choices, choice_len), generator=g)
    ids = torch.cat([ctx, choices], -1).reshape(args.items * n_choices, -1)
    reference = copy.deepcopy(base_fp32).cpu().float().eval()
    t0 = time.perf_counter()
    ref = mc_scores(reference, ids, ctx_len, n_choices)
    cpu_s = time.perf_counter() - t0
    del reference
    low = copy.deepcopy(base_fp32).to(device, torch.bfloat16).eval()
    sync(device)
    t0 = time.perf_counter()
    got = mc_scores(low, ids, ctx_len, n_choices)
    sync(device)
    dev_s = time.perf_counter() - t0
    agree = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    top2 = ref.topk(2, -1).values
    return {
        "check": "scoring",
        "ok": agree >= args.min_agreement,
        **({} if agree >= args.min_agreement else {"error": f"agreement {agree:.3f} < {args.min_agreement}"}),
        "items": args.items,
        "agreement": round(agree, 4),
        "max_abs_loglik_diff": round(float((ref - got).abs().max()), 4),
        "median_fp32_margin": round(float((top2[:, 0] - top2[:, 1]).median()), 4),
        "compared": f"{device.type} bf16 vs cpu fp32",
        "device_s": round(dev_s, 3),
        "cpu_fp32_s": round(cpu_s, 3),
    }


def guarded(name, fn) -> dict:
    try:
        return fn()
    except Exception as e:  # a failed check is a result: report it and run the others
        traceback.print_exc()
        return {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"}


def run_checks(args, device, ids):
    """One result per check, in order; the one-process student is freed before the FSDP one."""
    base = llama(args.size, 0, device)
    yield {
        "check": "env",
        "ok": True,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "params": sum(p.numel() for p in base.parameters()),
        "batch": ids.shape[0],
        "seq": ids.shape[1],
    }
    yield guarded("scoring", partial(scoring_check, args, base, device))
    teacher_v1 = frozen(llama(args.size, 1, device).to(torch.bfloat16))
    student = student_of(base)
    yield guarded("task", partial(train_steps, "task", student, partial(task_loss, student), ids, args, device))
    compat = partial(compat_loss, student, teacher_v1)
    yield guarded("compat", partial(train_steps, "compat", student, compat, ids, args, device))
    del student, base, compat
    if device.type == "cuda":
        torch.cuda.empty_cache()
    yield guarded("fsdp", partial(fsdp_check, args, device, teacher_v1, ids))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="1b")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per training check")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, help="micro-batch (default 4 for 1b, 2 for tiny)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 512 for 1b, 32 for tiny)")
    p.add_argument("--items", type=int, default=32, help="multiple-choice items for the scoring check")
    p.add_argument("--min-agreement", type=float, default=0.9)
    p.add_argument("--threads", type=int, help="CPU threads (default 1 for tiny: its ops are too small to share)")
    p.add_argument("--out", help="also write all results as one JSON file")
    args = p.parse_args(argv)
    if args.threads or args.size == "tiny":
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # an indexed device: NCCL's device_id needs one
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    batch, seq = args.batch or SHAPES[args.size]["batch"], args.seq or SHAPES[args.size]["seq"]
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB[args.size], (batch, seq), device=device)

    results: list[dict] = []
    for r in run_checks(args, device, ids):
        results.append(r)
        print(json.dumps(r), flush=True)

    env = results[0]
    print(f"\n{env['device']}  torch {env['torch']}  {env['params'] / 1e6:.1f}M params  micro-batch {batch}x{seq}")
    for r in results[1:]:
        mem = r.get("cuda_max_memory_allocated") or r.get("peak_rss")
        detail = (
            f"agreement {r['agreement']:.1%} over {r['items']} items ({r['compared']})"
            if "agreement" in r
            else f"{r['step_s_median']:.3f} s/step, peak {mem / 2**30:.2f} GiB"
            if "step_s_median" in r
            else ""
        )
        print(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['check']:<8} {detail}  {r.get('error', '')}".rstrip())
    ok = all(r["ok"] for r in results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ok": ok, "results": results}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
