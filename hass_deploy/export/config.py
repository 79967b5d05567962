"""What an export produces, as one frozen dataclass; each default and its help defined once (the CLI reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from hass_deploy.config import DTYPES, PREFILL_CHUNK, option
from hass_deploy.errors import ConfigError

ENGINES = ("onnx", "trt")
ATTENTION = ("onnx", "decomposed")
DRAFT_QUANTIZATIONS = ("int8",)
TARGET_QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class ExportConfig:
    """Sizes and precision baked into (or recorded beside) the exported graphs.

    The graphs themselves take any number of new rows and any KV buffer length; these numbers are the
    envelope the runtime checks requests against and the ranges a TensorRT profile will be built for.
    """

    engine: str = option("onnx", "onnx, or trt: the ONNX graphs, then TensorRT plans built from them (needs "
                         "TensorRT and an NVIDIA GPU).")
    # The precision greedy output is checked token for token in.
    dtype: str = option("fp32", "Weights and KV precision: fp32, fp16 or bf16.")
    max_seq_len: int | None = option(None, "KV rows S_max (default: min(max_position_embeddings, 4096)).")
    # cpu-notes: trees of 4-16 nodes pay on a CPU.
    max_tree_tokens: int = option(64, "Tree budget: most nodes one verify step takes.")
    max_top_k: int = option(16, "K of the draft graph's in-graph top-k (a tree's top-k may not exceed it).")
    prefill_chunk: int = option(PREFILL_CHUNK, "Longer prompts run as chunks of this many rows.")
    # The opset the dynamo exporter was measured to work at on this stack (cpu-notes §4).
    opset: int = option(23, "ONNX opset.")
    external_data: bool | None = None  # None: weights go to a side file only above the protobuf-safe size
    # "int8": the draft graph's MatMul weights quantised (ORT dynamic quantisation), for CPU. Lossless all the same:
    # the draft only proposes and the fp32 target decides, so only acceptance can change (docs/ONNX.md).
    draft_quantization: str | None = option(None, "int8: quantise the draft graph's weights for ONNX Runtime CPU "
                                            "(output unchanged; not for TensorRT).")
    # Besides the standard graphs (the reference and the TensorRT source), write the fused ONNX Runtime graphs
    # (`export/fused.py`): about a quarter of the operators, KV rows written in place; the ORT backend runs them.
    # None: with fp32 exports (they run fp32 on the CPU).
    ort_graphs: bool | None = option(None, "Also write the fused ONNX Runtime graphs the runtime runs (default: with "
                                     "fp32).")
    # Serving's batched steps (`serving/batcher.py`) on ONNX Runtime: fused graphs whose one run computes this many
    # sequences' steps (each over its own KV buffers), as big again as the fused graphs on disk and in memory.
    ort_batch: int = option(0, "Also write fused ONNX Runtime graphs that compute N sequences' steps in one run, "
                            "for `serve --parallel` (0: none; they take as much room again as the fused graphs).")
    # "int8": the fused target graph's weights are int8 blocks (weight-only, as CPU users run a target). "int4": a
    # GGUF target's own Q4_0 / Q4_1 blocks, bit for bit (`models/gguf_blocks.py`). Lossless then means identical to
    # plain decoding of the quantised target; the standard graphs stay fp32.
    target_quantization: str | None = option(None, "int8: the fused ONNX Runtime target graph with int8 weights; "
                                             "int4: with a GGUF target's own Q4_0/Q4_1 blocks (lossless w.r.t. the "
                                             "quantised target).")
    # "onnx": the standard graphs keep opset 23's RMSNormalization and RotaryEmbedding (TensorRT >= 10.15 imports
    # them). "decomposed": those expanded into their defining plain operators (`decompose.py`), for TensorRT before
    # 10.15 and wherever a fused kernel is not found. The same computation: both are validated token for token.
    attention: str = option("onnx", "onnx (RMSNormalization/RotaryEmbedding: TensorRT >= 10.15) or decomposed "
                            "(plain operators: any TensorRT 10).")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "trt" and (self.ort_graphs or self.draft_quantization or self.target_quantization):
            raise ConfigError("--engine trt builds TensorRT plans from the standard graphs in --dtype: the fused ONNX "
                              "Runtime graphs and int8/int4 quantisation are ONNX Runtime's (export them with --engine "
                              "onnx)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
        if self.ort_batch == 1 or self.ort_batch < 0:
            raise ConfigError(f"--ort-batch must be 0 (none) or >= 2 sequences, got {self.ort_batch}")
        if self.ort_batch and not self.fused:
            raise ConfigError("--ort-batch writes batched fused ONNX Runtime graphs: export with --dtype fp32 and "
                              "without --no-ort-graphs")
        if self.max_tree_tokens < 1 or self.max_top_k < 1 or self.prefill_chunk < 1:
            raise ConfigError("--max-tree-tokens, --max-top-k and --prefill-chunk must be >= 1")
        if self.max_seq_len is not None and self.max_tree_tokens >= self.max_seq_len:
            raise ConfigError(f"a tree budget of {self.max_tree_tokens} tokens does not fit S_max = "
                              f"{self.max_seq_len} KV rows (it needs at least one committed row beside it)")
        if self.draft_quantization is not None and self.draft_quantization not in DRAFT_QUANTIZATIONS:
            raise ConfigError(f"--draft-quantization must be one of {', '.join(DRAFT_QUANTIZATIONS)}, "
                              f"got {self.draft_quantization!r}")
        if self.draft_quantization is not None and self.dtype != "fp32":
            raise ConfigError("--draft-quantization int8 quantises an fp32 draft graph: export with --dtype fp32")
        if self.target_quantization is not None and self.target_quantization not in TARGET_QUANTIZATIONS:
            raise ConfigError(f"--target-quantization must be one of {', '.join(TARGET_QUANTIZATIONS)}, "
                              f"got {self.target_quantization!r}")
        if self.ort_graphs and self.dtype != "fp32":
            raise ConfigError("the fused ONNX Runtime graphs are fp32 (CPU): export them with --dtype fp32")
        if self.target_quantization is not None and not self.fused:
            raise ConfigError(f"--target-quantization {self.target_quantization} quantises the fused ONNX Runtime "
                              "target graph: export with --dtype fp32 and without --no-ort-graphs")
        if self.attention not in ATTENTION:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.opset < 18:
            raise ConfigError(f"--opset must be >= 18 (the dynamo exporter's floor), got {self.opset}")

    @property
    def fused(self) -> bool:
        """Whether the fused ONNX Runtime graphs are written (never for TensorRT, which builds the standard ones)."""
        if self.engine != "onnx":
            return False
        return self.ort_graphs if self.ort_graphs is not None else self.dtype == "fp32"
