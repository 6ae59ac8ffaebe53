"""The trainers: TRL's own trainer classes subclassed, with what every stage's training shares (the run
loop, precision, the non-finite guard, callbacks, held-out evaluation) in ``loop``. They import torch
and TRL; a stage imports its trainer module only when it runs (``posttrain.stages``)."""
