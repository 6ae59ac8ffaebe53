"""A frozen sequence classifier that scores (prompt, completion): what the reward sources built on a
learned model share (``reward_model``, ``safety`` with a classifier).

Loaded once, on first use, with its own tokenizer and chat template, on the device the policy
trains on (``cuda:LOCAL_RANK`` when a GPU is there, else the CPU), in the compute dtype (``auto``:
bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on a CPU), frozen and in eval
mode; a folder with a LoRA adapter loads base and adapter. Inputs are rendered the way TRL's
RewardTrainer renders its training pairs: a conversation through the chat template, plain text as
prompt + completion + EOS; text that is not valid UTF-8 is repaired, at most 64 × ``max_length``
characters of a completion are read, and the last ``max_length`` tokens are kept (the head reads
the last token). Batches are right-padded and run without gradients.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .process import local_rank
from .types import completion_text


def clean_text(text) -> str:
    """Text a tokenizer accepts: lone surrogates (undecodable bytes kept by surrogateescape) become U+FFFD."""
    text = text if isinstance(text, str) else completion_text(text)
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def is_local_folder(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def check_model_folder(path: str) -> None:
    """ValueError unless ``path`` is a stage reference, a hub id or a model folder (for options' validate)."""
    if path.startswith("stages.") or not is_local_folder(path):
        return
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ValueError(f"'{path}' is not a model folder (no config.json or adapter_config.json)")


STATS_FILE = "reward_stats.json"  # written next to its model by the reward_model stage


def check_normalize(model: str, normalize) -> None:
    """ValueError unless ``normalize`` is null, ``heldout`` (with the stats file there, for a local
    folder) or ``{mean, std > 0}`` (for options' validate)."""
    if isinstance(normalize, dict):
        if set(normalize) != {"mean", "std"} or normalize["std"] <= 0:
            raise ValueError("normalize must be {mean: number, std: positive number} or 'heldout'")
    if normalize == "heldout" and is_local_folder(model) and not (Path(model).expanduser() / STATS_FILE).is_file():
        raise ValueError(f"normalize: heldout needs {STATS_FILE} in '{model}' (the reward_model stage writes it); "
                         "give normalize: {mean, std} instead")


def normalization(model: str, normalize) -> tuple[float, float]:
    """(shift, scale) such that (r - shift) / scale is the normalised score: (0, 1) for null, the
    given mean and std, or for ``heldout`` those of ``reward_stats.json`` next to the model."""
    if not normalize:
        return 0.0, 1.0
    if normalize == "heldout":
        import json

        from .models import resolve_model_path

        stats = json.loads((Path(resolve_model_path(model)) / STATS_FILE).read_text())
        normalize = {"mean": stats["mean"], "std": stats["std"]}
    return float(normalize["mean"]), float(normalize["std"])


class SequenceClassifier:
    def __init__(self, path: str, *, dtype: str = "auto", batch_size: int = 8, max_length: int = 1024,
                 field: str = "plugins", what: str = "model"):
        self.path, self.dtype, self.batch_size, self.max_length = path, dtype, batch_size, max_length
        self.field, self.what = field, what
        self.model = self.tokenizer = None

    def _device_and_dtype(self):
        import torch

        cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank()}") if cuda else torch.device("cpu")
        dtype = self.dtype
        if dtype == "auto":
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32"
        return device, getattr(torch, dtype)

    def load(self):
        """The model and its tokenizer (loaded on first use)."""
        if self.model is not None:
            return self.model, self.tokenizer
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models import resolve_model_path, whole_models

        path = resolve_model_path(self.path)
        device, dtype = self._device_and_dtype()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            with whole_models():  # a scorer is whole in every process, also under ZeRO-3
                if (Path(path) / "adapter_config.json").is_file():
                    from peft import AutoPeftModelForSequenceClassification

                    model = AutoPeftModelForSequenceClassification.from_pretrained(path, dtype=dtype)
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the {self.what} '{path}': {str(e).splitlines()[0] if str(e) else e}",
                            field=self.field, fix="point at a sequence classifier folder (a reward_model stage's "
                                                  "merged/ or final/ output, or stages.NAME)") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.requires_grad_(False)
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        return self.model, self.tokenizer

    def token_ids(self, prompt, completion) -> list[int]:
        """The model's input for one (prompt, completion), rendered as its training pairs were."""
        from .seams import tokenize

        _, tokenizer = self.load()
        reply = clean_text(completion_text(completion))[-64 * self.max_length:]
        if isinstance(prompt, list):  # a conversation: the model's chat template
            messages = [{**m, "content": clean_text(str(m.get("content", "")))} if isinstance(m, dict) else m
                        for m in prompt]
            ids = tokenize(tokenizer, messages + [{"role": "assistant", "content": reply}])["input_ids"]
        else:
            text = clean_text("" if prompt is None else str(prompt)) + reply
            if not text.endswith(tokenizer.eos_token):
                text += tokenizer.eos_token
            ids = tokenize(tokenizer, text)["input_ids"]
        return ids[-self.max_length:]

    def logits(self, prompts: list, completions: list):
        """(n, labels) float32 logits of every pair, batched."""
        import torch

        model, tokenizer = self.load()
        device = next(model.parameters()).device
        inputs = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            # right padding: the classifier head reads the last non-padding token
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, :len(row)] = 1
            with torch.no_grad():
                out.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros((0, 1))
