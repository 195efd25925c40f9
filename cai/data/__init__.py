"""Data in and out: preference importers (`cai.data.importers`) and the shipped prompt sets
(`cai/data/prompts/*.jsonl`) and human comparison set (`cai/data/human/`)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
