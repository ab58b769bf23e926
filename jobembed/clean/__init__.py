"""The clean stage: rewrite noisy vacancy texts as compact occupation/skills/tasks strings."""
