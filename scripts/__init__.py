"""Recipe scripts. This file makes ``scripts`` a regular package: veRL installs a
top-level ``scripts`` package into site-packages, which would otherwise shadow
ours when tests do ``from scripts import ...``."""
