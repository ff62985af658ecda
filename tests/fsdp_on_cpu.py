"""Run a stage module with FSDP on CPU processes, to exercise the sharded code path where there is no GPU:

    accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 2 -m tests.fsdp_on_cpu stages.pretrain ...

accelerate (1.15) turns the FSDP config into FSDP only on accelerator devices; on CPU processes it trains
data-parallel instead (the stage warns). torch's FSDP2 itself runs over gloo, so this test helper marks the
accelerate state as FSDP, with the plugin the config describes, before the stage starts. Nothing else changes:
accelerate's prepare() shards the model with fully_shard, and saving and resuming go through its FSDP paths.
"""
import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def _as_fsdp(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP") != "true" or \
                self.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
            return
        self.distributed_type = DistributedType.FSDP
        if isinstance(self, state.AcceleratorState) and getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
    return patched


state.PartialState.__init__ = _as_fsdp(state.PartialState.__init__)
state.AcceleratorState.__init__ = _as_fsdp(state.AcceleratorState.__init__)

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
