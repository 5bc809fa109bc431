"""The road from our students to the Hugging Face world (SPEC §8): export to a transformers architecture, our cache
policies inside ``generate()`` (:class:`PiKVCache`) and the ``"pikv"`` attention implementation (registered on import)."""

from pikv_train.hf.cache_file import read_cache_config
from pikv_train.hf.command import export_checkpoint

try:  # needs transformers (the `hf` extra); without it, `export` says how to install it
    from pikv_train.hf.attention import train_under
    from pikv_train.hf.cache import PiKVCache, kv_bytes
    from pikv_train.hf.export import hf_config, hf_state_dict, save_folder, to_hf
except ImportError:  # pragma: no cover - depends on the optional extra
    pass

__all__ = ["PiKVCache", "export_checkpoint", "hf_config", "hf_state_dict", "kv_bytes", "read_cache_config", "save_folder",
           "to_hf", "train_under"]
