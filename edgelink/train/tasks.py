"""The receiver-side prompt of each bridge task (context priming).

A two-shot primer fixes the answer format, so every condition is scored the same way: the
target's logits at the last position, compared over the first token of each label's verbalizer.
Measured with Gemma-3-270M on the first 200 sentiment dev examples (raw argmax, no threshold):
a bare question scored 55% (it answers "positive" to everything), this primer 79%.
"""

from __future__ import annotations

from edgelink.bridge import BridgePrompt

PROMPTS: dict[str, BridgePrompt] = {
    "sentiment": BridgePrompt(
        primer=("Review: a dull, lifeless mess.\nSentiment: negative\n\n"
                "Review: a warm and funny delight.\nSentiment: positive\n\n"),
        before="Review:",
        after="\nSentiment:",
        labels={"negative": " negative", "positive": " positive"},
    ),
    "topic": BridgePrompt(
        primer=("Article: Shares fell sharply after the bank cut its profit forecast.\nTopic: business\n\n"
                "Article: The striker scored twice as the champions won again.\nTopic: sports\n\n"
                "Article: The minister announced the election date in parliament.\nTopic: politics\n\n"
                "Article: The film star won an award for her latest role.\nTopic: entertainment\n\n"
                "Article: The firm launched a faster mobile phone chip.\nTopic: tech\n\n"),
        before="Article:",
        after="\nTopic:",
        labels={"business": " business", "sports": " sports", "politics": " politics",
                "entertainment": " entertainment", "tech": " tech"},
    ),
}


def task_prompt(task: str) -> BridgePrompt:
    try:
        return PROMPTS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r} (one of {sorted(PROMPTS)})") from None
