"""veil server: reconstructs privatized prompts, prepends soft prompts, and generates."""
