"""`python -m torch.distributed.run ... tests/fsdp2_on_cpu.py train --config ...`: raftlm's CLI
with accelerate switched to FSDP2 on CPU (gloo). For tests only.

accelerate enables FSDP only on accelerators (with `--cpu` it silently falls back to DDP). This
shim switches its state to FSDP2 right after the Accelerator is built, so that FSDP2's code
paths in raftlm (weights all-gathered for per-process sampling, full state dicts for the
checkpoint, the optimizer state gathered and re-sharded on resume) run on a CPU-only machine.
It relies on accelerate internals (its shared state dicts); a GPU launch needs none of this.
"""

import sys

import accelerate
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import raftlm.stage.build
from raftlm.cli import main


class FSDP2OnCPU(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="FULL_STATE_DICT",
        )
        self.state.distributed_type = DistributedType.FSDP
        accelerate.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


raftlm.stage.build.Accelerator = FSDP2OnCPU
sys.exit(main(sys.argv[1:]))
