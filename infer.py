"""The spec's Python API: `from infer import SentenceGenerator; SentenceGenerator().generate(prompt, n)`."""

from next_speed.generation.generate import GenerateConfig, GenerationResult, SentenceGenerator

__all__ = ["SentenceGenerator", "GenerateConfig", "GenerationResult"]
