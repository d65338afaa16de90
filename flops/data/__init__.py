"""Node-local data: the Arrow Flight data server, its client and the mock data provider.

Each learner node serves one directory of `<tag>.<md5>.parquet` files (`server`), learners and the mock
provider talk to it through `client`, and `mock` turns bundled or local datasets into IID partitions.
"""
