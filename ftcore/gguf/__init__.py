"""GGUF (llama.cpp's format) as a model source and an export target, like an HF directory.

Reading: the header parsed here (read_header), each tensor's rows by a positioned read and
dequantized by the `gguf` package (the format's own library, an optional extra), the ModelConfig from the
`{arch}.*` keys, the tokenizer from `tokenizer.ggml.*`, and each tensor dequantized on its own -
only the rows asked for, so an FSDP rank touches only its shard (a quantized row is whole blocks
along the last dimension). What llama.cpp's converter did is undone: tensor names (blk.N.attn_q),
the row permutation of Q and K in llama-arch files (for its interleaved rotary kernel), the tied
output matrix it leaves out, and Llama 3.1's rope scaling stored as a `rope_freqs` tensor.
Writing: the same in reverse, one tensor in memory at a time, to FILE.tmp renamed at the end.
"""
from ftcore.gguf.format import (ARCHITECTURES, INSTALL, READ_TYPES, WRITE_TYPES, GGUFError, gguf_to_ours,  # noqa: F401
                                is_gguf, ours_to_gguf, pre_tokenizer, pre_tokenizer_name)
from ftcore.gguf.reader import GGUFModel, TensorInfo, open_gguf, read_header, tensor_entries  # noqa: F401
from ftcore.gguf.writer import check_exportable, write_gguf  # noqa: F401
