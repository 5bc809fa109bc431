"""The road from our students to the Hugging Face world (SPEC §8): export to a transformers architecture."""

from pikv_train.hf.export import hf_config, hf_state_dict, save_folder, to_hf

__all__ = ["hf_config", "hf_state_dict", "save_folder", "to_hf"]
