"""The model zoo: a shared tokenizer and small Llama-style v1/v2 bases built from configs."""
