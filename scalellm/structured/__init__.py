"""Structured outputs: constraints (JSON schema, regex, choice, grammar) compiled into llguidance
matchers, and the batch's token masks. Knows nothing of HTTP."""
from scalellm.structured.bitmask import BatchMasker, token_mask
from scalellm.structured.compiler import CompiledGrammar, GrammarCompiler
from scalellm.structured.params import StructuredOutputError, StructuredOutputsParams

__all__ = ["BatchMasker", "CompiledGrammar", "GrammarCompiler", "StructuredOutputError", "StructuredOutputsParams",
           "token_mask"]
