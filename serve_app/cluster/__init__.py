"""The cluster: planning it offline, and what each node runs beside Ray.

    nodes.py     a cluster-launcher file (cluster.yaml) checked with Ray's validator, as node types
    kuberay.py   a RayService manifest checked against KubeRay's CRD, as node types; its serveConfigV2
    capacity.py  packs every replica of the config onto the node types at min and max scale
                 (`python -m serve_app.capacity`)
    haproxy.py   the HAProxy ingress on a node: what Ray needs before it starts, the launcher Ray runs as
                 haproxy (admin ports on loopback, pid files), ending what a stopped Serve left running
    local.py     `qwen3-serve CONFIG` (make serve): `serve run` behind that ingress, stopped cleanly

May import: config.py only. Nothing here runs in a replica or the gateway.
"""
