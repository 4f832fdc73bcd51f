"""Structured output into a pydantic model (json_schema method, with the raw message kept)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from langchain_nanovllm import ChatNanoVLLM


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="The city's name")
    country: str = Field(description="The country the city is in")


def main() -> None:
    """Ask for a City; print the parsed object or the parsing error and the raw text."""
    llm = ChatNanoVLLM(temperature=0.0, max_tokens=64)
    structured = llm.with_structured_output(City, method="json_schema", include_raw=True)
    result = structured.invoke("Paris is the capital of France. Give the city and its country.")
    if result["parsed"] is not None:
        print("parsed:", result["parsed"])
    else:
        # The 135M embedded model does not always write valid JSON; larger models do.
        print("could not parse:", result["parsing_error"])
    print("raw:", result["raw"].content)


if __name__ == "__main__":
    main()
