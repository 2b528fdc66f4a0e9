"""Conveyor: an asynchronous, multi-process LLM inference engine."""
