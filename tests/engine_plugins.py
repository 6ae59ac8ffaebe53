"""A plugin for the DeepSpeed tests, enabled by import path (``engine_plugins:EngineProbe``): when training
begins, each process writes down what the engine did to the model it trains (one JSON line per process
and train() call): the ZeRO stage of the run's DeepSpeed config and how many of the model's parameters
this process holds only a shard of (DeepSpeed ZeRO-3 leaves an empty tensor in their place)."""

from dataclasses import dataclass

from posttrain import Plugin, hookimpl


class EngineProbe(Plugin):
    name = "engine_probe"
    description = "records the ZeRO stage and the sharded parameters when training begins"

    @dataclass
    class Options:
        out: str = ""

    @hookimpl
    def posttrain_callbacks(self, stage):
        import json
        import os

        from transformers import TrainerCallback

        out = self.options.out

        class Probe(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                zero = None
                if args.deepspeed:
                    zero = (args.hf_deepspeed_config.config.get("zero_optimization") or {}).get("stage", 0)
                params = list(model.parameters())
                sharded = [p for p in params if hasattr(p, "ds_id") and p.numel() == 0]
                record = {"stage": stage, "rank": int(os.environ.get("RANK", "0")), "zero_stage": zero,
                          "parameters": len(params), "sharded": len(sharded),
                          "trainable_sharded": sum(p.requires_grad for p in sharded)}
                with open(out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

        return [Probe()]
