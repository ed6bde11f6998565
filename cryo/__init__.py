"""cryo: high-throughput chunked backups over the AWS Backup Storage API.

The package is split by concept: ``model`` (the bundled service model),
``errors`` (the API's exceptions and cryo's own), ``storage`` (one interface,
an embedded repository and a remote client), and the command line in ``cli``.
Heavy dependencies (boto3, rich) are imported only by the modules that need
them, so ``cryo --help`` starts fast.
"""

__version__ = "0.1.0"
