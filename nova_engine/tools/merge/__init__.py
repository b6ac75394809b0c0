"""Model merging and ExPO (`nova merge`), streamed tensor by tensor.

    from nova_engine.tools.merge import ExPO, merge_models, expo_sweep
    merge_models(ExPO(alpha=0.3), [init_dir, aligned_dir], out_dir)
    rows = expo_sweep(init_dir, aligned_dir, [0.1, 0.3, 0.5, 1.0], "pairs.jsonl", out_dir)

Modules: safetensors_io (chunked reads / streamed writes of safetensors files), methods
(ExPO, linear, task arithmetic, SLERP, TIES), core (checks, output layout, the streamed
merge), score (preference-pair scoring), sweep (the ExPO alpha sweep), cli (`nova merge`).
"""

from nova_engine.tools.merge.cli import main
from nova_engine.tools.merge.core import MergeError, MergeResult, merge_models
from nova_engine.tools.merge.methods import METHODS, ExPO, Linear, Slerp, TaskArithmetic, Ties
from nova_engine.tools.merge.sweep import expo_sweep

__all__ = [
    "METHODS",
    "ExPO",
    "Linear",
    "MergeError",
    "MergeResult",
    "Slerp",
    "TaskArithmetic",
    "Ties",
    "expo_sweep",
    "main",
    "merge_models",
]
