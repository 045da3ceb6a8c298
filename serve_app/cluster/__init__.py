"""Cluster planning, offline: will a Serve config fit a Ray cluster or a KubeRay RayService?

    nodes.py     a cluster-launcher file (cluster.yaml) checked with Ray's validator, as node types
    kuberay.py   a RayService manifest checked against KubeRay's CRD, as node types; its serveConfigV2
    capacity.py  packs every replica of the config onto the node types at min and max scale
                 (`python -m serve_app.capacity`)

May import: config.py only. Nothing here runs in a replica or the gateway.
"""
