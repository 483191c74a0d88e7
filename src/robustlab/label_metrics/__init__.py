"""Label metrics for WPGD (spec wpgd.md section 3): a cost between classes. `metric` holds the checks, powers and
normalisation, the shipped CIFAR-10 WordNet matrix and the WordNet builder; `visual` measures one from a trained
model (targeted DeepFool distances). Below `methods` (WPGD trains with one) and above `attacks` (`visual` attacks)."""
