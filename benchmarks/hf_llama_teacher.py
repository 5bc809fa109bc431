"""Save our trained dense teacher as a Hugging Face Llama folder (weights + a byte-level tokenizer).

    python benchmarks/hf_llama_teacher.py [--checkpoint runs/teacher/checkpoints/last.ckpt] [--out runs/hf_teacher]

Our dense decoder is the Llama architecture (pre-norm RMSNorm, half-split RoPE, GQA, SwiGLU, tied
embeddings), so the conversion is a renaming of weights; the tokenizer maps UTF-8 bytes to ids 0..255
and <eos>/<pad> to 256/257, exactly as ``data.tokenizer: byte``. The script checks that the saved model's
logits equal our teacher's (relative 1e-4) before it reports success. ``benchmarks/objectives.py`` uses the
folder to run Speculative KD with a Hugging Face teacher end to end on the same data as our own teacher.
(A general Hugging Face export of students is issue 15; this is the benchmark's own small converter.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose ids equal :class:`pikv_train.data.tokenizer.ByteTokenizer`'s."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}  # byte b <-> its printable stand-in, id b
    model = tokenizers.models.BPE(vocab=vocab, merges=[])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<pad>"])  # ids 256, 257
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def export(checkpoint: Path, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pikv_train.data.tokenizer import ByteTokenizer
    from pikv_train.evaluate import load_decoder

    ours = load_decoder(checkpoint).eval()
    c = ours.cfg
    if c.moe is not None or not c.tie_embeddings:
        raise SystemExit(f"{checkpoint} is not a dense, tied-embedding decoder; export a teacher checkpoint")
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        bos_token_id=None, eos_token_id=256, pad_token_id=257, attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(cfg).eval()
    kv = c.n_kv_head * c.head_dim
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight}
    for i, blk in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": blk.attn_norm.weight,
            p + "post_attention_layernorm.weight": blk.ffn_norm.weight,
            p + "self_attn.q_proj.weight": blk.attn.q_proj.weight,
            p + "self_attn.k_proj.weight": blk.attn.kv_proj.weight[:kv],  # kv_proj rows: keys, then values
            p + "self_attn.v_proj.weight": blk.attn.kv_proj.weight[kv:],
            p + "self_attn.o_proj.weight": blk.attn.o_proj.weight,
            p + "mlp.gate_proj.weight": blk.ffn.gate.weight,
            p + "mlp.up_proj.weight": blk.ffn.up.weight,
            p + "mlp.down_proj.weight": blk.ffn.down.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise SystemExit(f"conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    tok = byte_tokenizer()
    text = "The teacher is a Llama now. Ünïcödé bytes too."
    ids = tok.encode(text, add_special_tokens=False)
    if ids != ByteTokenizer().encode(text):
        raise SystemExit("the Hugging Face byte tokenizer does not reproduce data.tokenizer: byte")
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = ours.logits(ours(x).hidden), hf(x).logits
    err = float((a - b).norm() / b.norm())
    if err > 1e-4:
        raise SystemExit(f"the exported Llama's logits differ from the teacher's (relative {err:.2e})")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {out} (Llama, {sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M parameters; "
          f"logits equal the teacher's to relative {err:.1e})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/teacher/checkpoints/last.ckpt")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/hf_teacher")
    args = ap.parse_args()
    export(args.checkpoint, args.out)


if __name__ == "__main__":
    main()
