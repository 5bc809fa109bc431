"""Data: tokenizers, the embedded default corpus and the LightningDataModule."""

from pikv_train.data.corpus import embedded_documents
from pikv_train.data.datamodule import PackedDataset, TextDataModule
from pikv_train.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "PackedDataset", "TextDataModule", "build_tokenizer", "embedded_documents"]
