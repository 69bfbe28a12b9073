"""The Delta side: the sink and its data files, the commit writer and its claim on its app id, table targets
(local, cloud, Unity Catalog, Databricks), and maintenance (lease, compaction, Z-order, vacuum, statistics, the scheduler).

The only folder that imports deltalake. Imports ``stream``, ``pi`` and the top-level helpers.
"""
