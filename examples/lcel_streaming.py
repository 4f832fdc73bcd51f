"""An LCEL chain (prompt | llm | StrOutputParser) streaming tokens through a callback handler."""

from __future__ import annotations

import sys

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_nanovllm import ChatNanoVLLM


class PrintTokens(BaseCallbackHandler):
    """Prints each token as the engine produces it."""

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        """Write the token without a newline."""
        sys.stdout.write(token)
        sys.stdout.flush()


def main() -> None:
    """Build the chain and stream one answer."""
    llm = ChatNanoVLLM(temperature=0.0, max_tokens=96, streaming=True)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant."), ("user", "Explain {topic} in two sentences.")]
    )
    chain = prompt | llm | StrOutputParser()
    answer = chain.invoke({"topic": "photosynthesis"}, config={"callbacks": [PrintTokens()]})
    print(f"\n\n[{len(answer)} characters]")
    print("memory:", {k: v for k, v in llm.llm.memory().items() if v is not None})


if __name__ == "__main__":
    main()
