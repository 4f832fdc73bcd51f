"""A tool-calling loop: the model asks for a tool, we run it, feed the result back, and it answers."""

from __future__ import annotations

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_nanovllm import ChatNanoVLLM


@tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"It is sunny and 22 degrees in {city}."


def main() -> None:
    """Up to three rounds of tool calls, then the final answer."""
    llm = ChatNanoVLLM(temperature=0.0, max_tokens=96)
    tools = {"get_weather": get_weather}
    messages = [HumanMessage("What is the weather in Paris?")]
    # The first turn forces a call to get_weather (its name and the start of the arguments are pre-filled): the
    # small embedded model rarely calls tools on its own.
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    for _ in range(3):
        messages.append(ai)
        if not ai.tool_calls:
            break
        for call in ai.tool_calls:
            print(f"tool call: {call['name']}({call['args']})")
            try:
                result, status = tools[call["name"]].invoke(call["args"]), "success"
            except Exception as exc:  # bad arguments from the model go back to it as an error result
                result, status = f"error: {exc}", "error"
            print(f"  -> {status}: {result[:100]}")
            messages.append(ToolMessage(result, tool_call_id=call["id"], status=status))
        ai = llm.bind_tools([get_weather]).invoke(messages)
    if ai.invalid_tool_calls:
        print("the model wrote an invalid tool call:", ai.invalid_tool_calls[0]["error"])
    print("answer:", ai.content)


if __name__ == "__main__":
    main()
