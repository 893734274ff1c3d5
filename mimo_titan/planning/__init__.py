"""Layout planning: measured and modelled costs of each module, and the search over module layouts."""
