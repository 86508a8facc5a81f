"""FSDP2 on the real SmolLM2-135M-Instruct (30 blocks, GQA 9/3 heads, lm_head tied to the
embeddings, 49k vocabulary): two gloo workers train the compat adapter, each holding half of the
student's and of the inline v1 teacher's parameter bytes, on the single process's loss trajectory
(fp32, and bf16 + activation checkpointing, which stays within BF16_RTOL of fp32).

v1's base is SmolLM2 with every weight multiplied by (1 + 0.05 N(0, 1)), saved as its own
safetensors directory: the v1 teacher is read (shard by shard) from other files than the student,
and the KL to it is large. Measured on the first batch: loss 0.093; with v1 = SmolLM2 itself (only
the LoRA adapters differing) it was 0.002, a loss path that could hardly go wrong visibly.
"""

from pathlib import Path

import pytest
import torch
from fsdp_helpers import check_sharded_run, compat_raw, single_process, two_fsdp_workers

SMOLLM2_PARAMS = 134_515_008  # embeddings 49152 x 576 (tied lm_head) + 30 blocks + final norm
BATCH, SEQ = 2, 32  # one 32-token sequence per worker
LR = 1e-3
# bf16 + checkpointing against fp32, per step: |loss_bf16 - loss_fp32| <= BF16_RTOL * loss_fp32.
# Measured on SmolLM2: at most 2.5 % over the 4 steps (1.2 % at step 0, before any update); a
# LoRA that did not train would be 14-46 % off at steps 1-3.
BF16_RTOL = 0.05


# Plain English (written for this test): SmolLM2 predicts many of its tokens, so the MUSCLE mask
# sends tokens to both teachers (on random tokens the student is always wrong: all go to v1).
TEXT = (
    "The river starts as a thin stream high in the mountains, where snow melts in the spring sun. "
    "It runs quickly over rocks and stones, cutting a narrow valley into the hillside. Further down, "
    "smaller streams join it from both sides, and the water becomes wider, deeper and slower. Farmers "
    "have lived along its banks for thousands of years, because the soil there is rich and easy to work. "
    "In the summer the children swim in the shallow pools, while their parents fish for trout near the old "
    "stone bridge. When heavy rain falls in the autumn, the river can rise very fast and flood the fields, "
    "so the villages were built on higher ground."
)


def _text_batches(tokenizer, n: int, batch: int, seq: int) -> list[dict]:
    """`n` batches of `batch` consecutive `seq`-token windows of TEXT, labelled with the next token
    (none ignored)."""
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    if len(ids) <= n * batch * seq:
        raise ValueError(f"TEXT has {len(ids)} tokens; {n} x {batch} x {seq} + 1 needed")
    x = ids[: n * batch * seq].view(n, batch, seq)
    y = ids[1 : n * batch * seq + 1].view(n, batch, seq)
    return [{"input_ids": a, "attention_mask": torch.ones_like(a), "labels": b} for a, b in zip(x, y)]


def _perturbed_copy(base: Path, out: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """`base` with each weight w -> w * (1 + scale N(0, 1)), deterministic, in a new directory."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(base.glob("*.safetensors")):
        weights = load_file(f)
        for k in sorted(weights):
            w = weights[k]
            weights[k] = w * (1 + scale * torch.randn(w.shape, generator=g, dtype=w.dtype))
        save_file(weights, out / f.name, metadata={"format": "pt"})
    return out


def _small_lora_dir(base: Path, out: Path, seed: int, std: float = 0.02) -> Path:
    """A PEFT LoRA (r 4, all linear layers) with lora_B ~ N(0, std): SmolLM2 stays a language model
    with it (CE 4.3 nats on TEXT), where PEFT's non-zero random init (B ~ U(+-0.5)) would drown it.
    Built on the weightless skeleton: the adapter does not need the base's values."""
    from peft import LoraConfig, get_peft_model

    from muscle_ray.training.lora import skeleton

    torch.manual_seed(seed)
    model = get_peft_model(skeleton(str(base)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Two workers on a shared 2-core machine: more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_smollm2_fsdp2_two_workers_hold_half_and_follow_fp32(tmp_path, smollm2_dir):
    """4 compat steps over two batches of TEXT (A, B, A, B), fp32 and bf16 + checkpointing, on two
    gloo workers and on one process. `check_sharded_run` asserts the halves and the trajectories
    (measured: both sharded trajectories bit-identical to the single process's); this test that
    the model is SmolLM2's 134.5M parameters, whole on one process (the LoRA weights add < 4 %) and
    half on each worker, the tied lm_head included, and that the adapter trains. ~3 minutes on
    2 busy cores (the gloo collectives of 31 FSDP2 units, five passes a micro-batch, dominate)."""
    from transformers import AutoTokenizer

    v2 = Path(smollm2_dir)
    v1 = _perturbed_copy(v2, tmp_path / "v1")
    a1, a2 = _small_lora_dir(v1, tmp_path / "a1", seed=0), _small_lora_dir(v2, tmp_path / "a2", seed=1)
    batches = _text_batches(AutoTokenizer.from_pretrained(v2), 2, BATCH, SEQ) * 2
    fsdp = {"strategy": "fsdp", "num_workers": 2}
    raws = {
        "fp32": compat_raw(v1, a1, v2, a2, lr=LR, batch=BATCH, **fsdp),
        "bf16": compat_raw(v1, a1, v2, a2, lr=LR, batch=BATCH, **fsdp, precision="bf16", activation_checkpointing=True),
    }
    ranks = two_fsdp_workers(raws, batches, tmp_path)
    single = single_process(raws, batches)

    check_sharded_run(ranks, single, BF16_RTOL)
    for name, element in (("fp32", 4), ("bf16", 2)):
        whole = element * SMOLLM2_PARAMS  # the base's bytes; the fp32 LoRA weights come on top
        assert single[name]["base_params"] == SMOLLM2_PARAMS, name
        for key in ("student_bytes", "teacher_bytes"):
            assert whole < single[name][key] < 1.04 * whole, (name, key)
            for r in ranks:
                assert r[name]["base_params"] == SMOLLM2_PARAMS, name  # the full shapes, sharded
                assert whole / 2 < r[name][key] < 1.04 * whole / 2, (name, key)
        losses = ranks[0][name]["losses"]
        assert losses[2] < 0.9 * losses[0] and losses[3] < 0.9 * losses[1], name  # A and B again: it trains
    assert single["fp32"]["losses"][0] > 0.05  # v1's own weights: see the module docstring
