"""Sixteen chains in flight at once from asyncio: they share one continuous batch on one engine."""

from __future__ import annotations

import asyncio
import time

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_nanovllm import ChatNanoVLLM


async def main() -> None:
    """Run one chain alone, then sixteen together, and compare wall times."""
    llm = ChatNanoVLLM(temperature=0.0, max_tokens=48)
    chain = ChatPromptTemplate.from_messages([("user", "Give one fun fact about {animal}.")]) | llm | StrOutputParser()
    animals = ["cats", "dogs", "owls", "whales", "bees", "ants", "foxes", "bats"] * 2
    await chain.ainvoke({"animal": "cats"})  # load the engine
    t = time.perf_counter()
    await chain.ainvoke({"animal": "cats"})
    one = time.perf_counter() - t
    t = time.perf_counter()
    answers = await asyncio.gather(*[chain.ainvoke({"animal": a}) for a in animals])
    many = time.perf_counter() - t
    for a, text in list(zip(animals, answers))[:4]:
        print(f"{a}: {text.strip()[:80]}")
    print(f"1 chain: {one:.2f}s; 16 chains at once: {many:.2f}s ({many / one:.1f}x one, not 16x)")
    print("engine stats:", llm.llm.stats())


if __name__ == "__main__":
    asyncio.run(main())
