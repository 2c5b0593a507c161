"""Tasks built on third-party models (Hugging Face transformers), for tests/test_third_party.py."""
