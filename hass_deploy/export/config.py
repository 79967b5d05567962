"""What an export produces, as one frozen dataclass; the CLI reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass

from hass_deploy.errors import ConfigError

ENGINES = ("onnx", "trt")
DTYPES = ("fp32", "fp16", "bf16")
ATTENTION = ("onnx", "decomposed")
DRAFT_QUANTIZATIONS = ("int8",)
TARGET_QUANTIZATIONS = ("int8",)


@dataclass(frozen=True)
class ExportConfig:
    """Sizes and precision baked into (or recorded beside) the exported graphs.

    The graphs themselves take any number of new rows and any KV buffer length; these numbers are the
    envelope the runtime checks requests against and the ranges a TensorRT profile will be built for.
    """

    engine: str = "onnx"
    dtype: str = "fp32"  # the precision greedy output is checked token for token in
    max_seq_len: int | None = None  # KV rows S_max; None = min(the target's max_position_embeddings, 4096)
    max_tree_tokens: int = 64  # the most nodes one verification step takes: the tree budget (cpu-notes: 4-16 pay)
    max_top_k: int = 16  # K of the draft graph's in-graph top-k; a tree's top_k must not exceed it
    prefill_chunk: int = 128  # a longer causal step (a prompt) runs as chunks of this many rows
    opset: int = 23  # the opset the dynamo exporter was measured to work at on this stack (cpu-notes §4)
    external_data: bool | None = None  # None: weights go to a side file only above the protobuf-safe size
    # "int8": the draft graph's MatMul weights quantised (ORT dynamic quantisation), for CPU. Lossless all the same:
    # the draft only proposes and the fp32 target decides, so only acceptance can change (docs/ONNX.md).
    draft_quantization: str | None = None
    # Besides the standard graphs (the reference and the TensorRT source), write the fused ONNX Runtime graphs
    # (`export/fused.py`): about a quarter of the operators, KV rows written in place; the ORT backend runs them.
    # None: with fp32 exports (they run fp32 on the CPU).
    ort_graphs: bool | None = None
    # "int8": the fused target graph's weights are int8 blocks (weight-only, as CPU users run a target). Lossless
    # then means identical to plain decoding of the quantised target; the standard graphs stay fp32.
    target_quantization: str | None = None
    # "onnx": the standard graphs keep opset 23's RMSNormalization and RotaryEmbedding (TensorRT >= 10.15 imports
    # them). "decomposed": those expanded into their defining plain operators (`decompose.py`), for TensorRT before
    # 10.15 and wherever a fused kernel is not found. The same computation: both are validated token for token.
    attention: str = "onnx"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "trt" and (self.ort_graphs or self.draft_quantization or self.target_quantization):
            raise ConfigError("--engine trt builds TensorRT plans from the standard graphs in --dtype: the fused ONNX "
                              "Runtime graphs and int8 quantisation are ONNX Runtime's (export them with --engine onnx)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"--max-seq-len must be >= 2, got {self.max_seq_len}")
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
            raise ConfigError("--target-quantization int8 quantises the fused ONNX Runtime target graph: export "
                              "with --dtype fp32 and without --no-ort-graphs")
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
