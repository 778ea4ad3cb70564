"""The prompts E is drawn from in a TRL run: the trainer's dataset, rendered as ``GRPOTrainer`` renders them."""

from fprobe.sampling.prompts import is_conversation


def _is_single_user_turn(prompt) -> bool:
    """A conversational prompt that is one user message with text content."""
    return isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user" and isinstance(prompt[0].get("content"), str)


class TrainerChatTemplate:
    """The trainer's tokenizer, whose ``apply_chat_template`` renders as TRL's ``GRPOTrainer`` does: with the
    trainer's own template (if it set one), its tools and its ``chat_template_kwargs``. Anything else is the
    tokenizer's."""

    def __init__(self, trainer):
        self._tokenizer = trainer.processing_class
        self._template = getattr(trainer, "chat_template", None)
        self._tools = getattr(trainer, "tools", None) or None
        self._kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or {})

    @property
    def chat_template(self):
        return self._template or self._tokenizer.chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self._tokenizer.apply_chat_template(
            conversation, chat_template=self._template, tools=self._tools, **{**self._kwargs, **kwargs})

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def dataset_prompts(trainer) -> tuple[list[dict], bool]:
    """(prompt records, chat template?) from the trainer's dataset: plain prompts as they are, conversations
    (a system turn and several turns included) through the tokenizer's chat template, as the trainer renders
    them; messages with structured (non-text) content need ``prompts=``."""
    dataset = trainer.train_dataset
    if dataset is None or "prompt" not in getattr(dataset, "column_names", ()):
        raise ValueError("the trainer's dataset has no 'prompt' column: pass prompts= to fprobe.trl.attach")
    prompts = list(dataset["prompt"])
    if all(isinstance(p, str) for p in prompts):
        return [{"prompt": p} for p in prompts], False
    if all(_is_single_user_turn(p) for p in prompts):
        return [{"prompt": p[0]["content"]} for p in prompts], True
    if all(is_conversation(p) for p in prompts):
        return [{"prompt": list(p)} for p in prompts], True
    raise ValueError(
        "the trainer's prompts are conversations that fprobe cannot re-render (structured, non-text content): "
        "pass prompts= (texts) to fprobe.trl.attach"
    )
