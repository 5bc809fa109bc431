"""A tiny randomly initialised Hugging Face causal LM (saved to a temporary folder with its tokenizer)
serves as teacher end to end through the CLI; padded vocabularies are sliced; different tokenizers are
refused."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rel, run_cli, write

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tokenizer(texts, vocab_size):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", "<pad>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def _hf_teacher(folder, padded_vocab: int, texts, tok_vocab=300):
    tok = _tokenizer(texts, tok_vocab)
    cfg = transformers.LlamaConfig(vocab_size=padded_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return len(tok)


def _texts():
    from pikv_train.data import embedded_documents

    return [d["text"] for d in embedded_documents(8)]


def test_hf_teacher_end_to_end_with_padded_vocabulary(tmp_path):
    folder = tmp_path / "hf_teacher"
    real = _hf_teacher(folder, padded_vocab=320, texts=_texts())  # LM head padded beyond the tokenizer
    assert real < 320
    recipe = write(
        tmp_path / "hf.yaml",
        f"""
        defaults: [configs/trainer/cpu.yaml]
        seed_everything: 0
        out_dir: {tmp_path / 'run'}
        model:
          class_path: pikv_train.tasks.DistillationTask
          init_args:
            student: configs/model/nano_moe.yaml
            teacher: {{hf_path: {folder}}}
        data: {{seq_len: 32, batch_size: 2, max_documents: 8}}
        trainer: {{max_steps: 3, limit_val_batches: 2, val_check_interval: 3, enable_progress_bar: false}}
        """,
    )
    # No data.tokenizer and no student vocab_size: both follow the teacher's tokenizer.
    proc = run_cli("fit", "--config", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["student.embed.weight"].shape[0] == real
    # The building block's 258 is replaced, and the run says so as a warning (not an info line).
    assert real > 258 and f"cannot hold the teacher tokenizer's {real} tokens: using {real}" in proc.stderr


def test_padded_vocabulary_is_sliced_to_the_real_one(tmp_path):
    from pikv_train.models import ModelConfig
    from pikv_train.tasks import DistillationTask, TeacherConfig

    folder = tmp_path / "t"
    real = _hf_teacher(folder, padded_vocab=320, texts=_texts())
    task = DistillationTask(student=ModelConfig.preset("nano-moe", vocab_size=real), teacher=TeacherConfig(hf_path=str(folder)))
    task.configure_model()
    assert task.shared_vocab == real and task.teacher.head_weight.shape[0] == 320
    assert not any(p.requires_grad for p in task.teacher.parameters()) and not task.teacher.training
    ids = torch.randint(0, real, (2, 12))
    from pikv_train.distill import chunked_distill_loss, forward_kl

    # The fused loss over the shared vocabulary, with the teacher's head (the end-to-end test runs the task's).
    with torch.no_grad():
        s_hidden, t_hidden = task.student(ids).hidden.flatten(0, 1), task.teacher(ids).hidden.flatten(0, 1)
        loss = chunked_distill_loss(s_hidden, task.student.head_weight, t_hidden, teacher_head=task.teacher.head,
                                    vocab_size=task.shared_vocab, chunk_size=5)
        # Reference: full logits of both models restricted to the real vocabulary.
        s = task.student.logits(task.student(ids).hidden)[..., :real]
        t = task.teacher.model(ids).logits[..., :real]
    assert_close_rel(loss, forward_kl(student_logits=s, teacher_logits=t), 1e-5)


def test_teacher_import_path_is_the_hf_causal_lm_wrapper(tmp_path):
    from pikv_train.models.hf_causal_lm import HFCausalLM
    from pikv_train.tasks.hf_teacher import HFTeacher

    assert HFTeacher is HFCausalLM
    folder = tmp_path / "t"
    real = _hf_teacher(folder, padded_vocab=320, texts=_texts())
    teacher = HFTeacher(str(folder))
    assert (teacher.cfg.vocab_size, teacher.cfg.n_layer, teacher.cfg.max_seq_len) == (320, 2, 128)
    assert teacher.real_vocab_size == real and teacher.head.weight is teacher.head_weight


def test_different_tokenizers_are_refused(tmp_path):
    folder = tmp_path / "t"
    _hf_teacher(folder, padded_vocab=320, texts=_texts())
    recipe = write(
        tmp_path / "hf.yaml",
        f"""
        defaults: [configs/trainer/cpu.yaml]
        out_dir: {tmp_path / 'run'}
        model:
          class_path: pikv_train.tasks.DistillationTask
          init_args:
            student: configs/model/nano_moe.yaml
            teacher: {{hf_path: {folder}}}
        data: {{seq_len: 32, batch_size: 2, max_documents: 8}}
        trainer: {{max_steps: 1}}
        """,
    )
    other = tmp_path / "other_tok"
    _tokenizer(["completely different text " * 50], 280).save_pretrained(other)
    proc = run_cli("fit", "--config", str(recipe), "--data.tokenizer", str(other), "--model.init_args.student.vocab_size", "320")
    assert proc.returncode == 2
    assert "teacher and data tokenizers differ" in proc.stderr.strip().splitlines()[-1]
