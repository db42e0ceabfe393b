"""The random tiny target's tokenizer text: a little hand-written English, Q&A and code.

It only has to be big enough for a few hundred BPE merges; the numeric lines add digits.
"""

from __future__ import annotations

from collections.abc import Iterator

_CORPUS_TEXT = """\
The morning was cold, so Maya put on her green coat before walking to the station.
A small dog waited by the bakery door, hoping someone would drop a piece of bread.
Rivers carry sand and stones from the mountains down to the sea over many years.
When the library opened, the children ran straight to the shelf with picture books.
Please remember to water the tomatoes on Tuesday and Friday while I am away.
The committee will meet again next week to discuss the budget for the new bridge.
Our team finished the project early because everyone shared the work fairly.
She wrote a letter to her grandfather and told him about the school play.
Bright stars filled the sky after the storm had moved far to the east.
He could not find his keys, so he checked every pocket twice and then the kitchen.
Question: What is the capital of France?
Answer: The capital of France is Paris.
Question: How many days are there in a week?
Answer: There are seven days in a week.
Question: Why do leaves change colour in autumn?
Answer: Trees stop making green chlorophyll, so yellow and red pigments show through.
Question: Can you give me a short tip for learning a new language?
Answer: Practise a little every day, and read simple stories out loud.
User: Could you summarise this paragraph in one sentence?
Assistant: Sure. The paragraph says that regular exercise improves sleep and mood.
User: Thanks! What should I cook for dinner tonight?
Assistant: A vegetable stir fry with rice is quick, healthy and easy to make.
def add(a, b):
    return a + b

for item in items:
    if item.is_ready():
        print("ready:", item.name)

The recipe needs two cups of flour, one egg, a pinch of salt and some warm milk.
Mix the dry ingredients first, then add the milk slowly while stirring.
Train number 42 leaves at 9:15 and arrives in the city at 11:40.
The museum is closed on Mondays, but the garden stays open until sunset.
If it rains tomorrow, we will play board games inside instead of going hiking.
Good software is tested, documented and kept simple enough for others to change.
The quick brown fox jumps over the lazy dog while the farmer watches from the gate.
Learning to ride a bicycle takes patience, balance and a few scraped knees.
A teacher asked the class to explain why the moon seems to change its shape.
The answer is that we see different parts of its sunlit side as it orbits the Earth.
Coffee, tea or water? I would like a glass of water, please.
The system prompt tells the assistant how to answer the user, and the user asks the questions.
It was the best meal they had eaten in months, and they talked late into the night.
"""

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _numeric_lines() -> Iterator[str]:
    """Simple arithmetic and counting lines, so that digits and number words get merges too."""
    for a in range(1, 13):
        b = (a * 7) % 11 + 1
        yield f"Question: What is {a} plus {b}? Answer: {a} plus {b} is {a + b}."
        yield f"Question: What is {a} times {b}? Answer: {a} times {b} is {a * b}."
    for i, word in enumerate(_NUMBER_WORDS):
        yield f"The word for {i} is {word}, and {word} comes before {i + 1}."
    yield "Counting: " + ", ".join(str(i) for i in range(0, 120, 3)) + "."


def tiny_corpus() -> list[str]:
    """The built-in training text of the tiny tokenizer, one line per entry."""
    return [*_CORPUS_TEXT.splitlines(), *_numeric_lines()]
