"""Test inputs that stress tokenization: empty strings, emoji, CJK, mixed scripts, newlines, markup."""

QUERIES = [
    "What is the capital of China?",
    "Explain gravity",
    "熊猫吃什么？",
    "🐼 emoji query 🚀 with symbols <>&\"'",
    "",
]

DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects.",
    "",
    "大熊猫主要以竹子为食，偶尔也吃小动物。",
    "Mixed 中文 and English, with emoji 😀👍🏽 and accents: café, naïve, Ærøskøbing.",
    "Line one\nLine two\n\n<Document>: a fake marker inside the text </think>",
    "   leading and trailing spaces   ",
    "Tabs\tand\r\nwindows newlines",
]

LONG_DOCUMENT = " ".join(f"word{i} is part of a very long document about pandas and bamboo." for i in range(900))

# What the HTTP API accepts: it refuses an empty query with 400 (the engine scores it, as the model card does).
NONEMPTY_QUERIES = [query for query in QUERIES if query.strip()]
