"""Studies across representation versions: the exchange rate (`exchange_rate`) and scaling laws
(`scaling`), over versions made by `variants`, scored downstream by `downstream`, fitted by `fit`."""
