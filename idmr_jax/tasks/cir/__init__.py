"""Composed image retrieval benchmarks (CIRR, CIRCO, FashionIQ, GeneCIS): release readers, converted shards, the
official protocols, and the evaluation of any model the framework trains or imports (config name ``cir``)."""
