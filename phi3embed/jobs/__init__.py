"""One job (sources -> records) and the engines that run it: the local pipeline and a Ray Data pool."""
