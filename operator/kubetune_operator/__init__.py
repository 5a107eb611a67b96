"""kubetune operator (kopf). Not built yet: the trainer fixes the contracts it will use
(kubetune.contract, kubetune.spec); see operator/README.md."""
