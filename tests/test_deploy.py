"""deploy/kubernetes/: the manifests parse, their commands parse with our own flags, probes and the
termination grace fit the server's drain, and the gateway finds the servers by their headless Service."""
import os
import shlex

import yaml

from scalellm.gateway.__main__ import parse_args as gateway_args
from scalellm.server.__main__ import parse_args as server_args
from tests.server_utils import ROOT

DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")


def load(name: str) -> dict[str, dict]:
    with open(os.path.join(DEPLOY, name)) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_servers_behind_a_headless_service_with_probes_and_a_drain():
    docs = load("server.yaml")
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"] == service["spec"]["selector"]
    assert service["spec"]["clusterIP"] == "None"
    c = container(deployment)
    assert c["command"][-1] == "serve"
    args = server_args(c["args"], prog="scalellm serve", model_positional=True)
    assert args.host == "0.0.0.0" and args.port == c["ports"][0]["containerPort"] == service["spec"]["ports"][0]["port"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + args.shutdown_grace


def test_the_gateway_finds_the_servers_by_dns():
    servers, gateway = load("server.yaml"), load("gateway.yaml")
    c = container(gateway["Deployment"])
    args, launched = gateway_args(c["args"])
    assert not launched and args.policy in ("cache_aware", "power_of_two")
    (replica,) = args.replica
    host, port = replica.split("//")[1].split(":")
    service = servers["Service"]
    assert host.split(".")[0] == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["Service"]["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert gateway["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.shutdown_grace
    assert shlex.join(c["command"]).endswith("-m scalellm.gateway")
