"""Prompts in: prompt files, built-in tasks, the chat template, and the order they are drawn in."""
