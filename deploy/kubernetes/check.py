#!/usr/bin/env python3
"""Check the Kubernetes manifests for what matters to the gateway (deploy/check.sh runs it in CI).

No cluster and no schema validator (kubeconform and kubeval download from GitHub, which CI does
not reach); instead the fields that make or break a deployment of this gateway:
- every kustomization's resources exist and parse; labels, selectors and Services line up;
- the gateway container: probes on /healthz (liveness) and /readyz (readiness) on the API port,
  a preStop sleep, resource requests and a memory limit, Prometheus scrape annotations on the
  API port, secrets from the Secret (never in the ConfigMap), the ConfigMap mounted where the
  image reads its config;
- terminationGracePeriodSeconds covers preStop + [proxy] drain_timeout + the final flush;
- the ConfigMap's gateway.toml and plans.toml pass `quota-gateway check-config` (when the
  binary is built), and their listen ports are the container ports;
- the sidecar proxies to a container of its own pod over loopback.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "kubernetes"
BIN = ROOT / "target" / "debug" / "quota-gateway"
CONFIG_DIR = "/etc/quota-gateway"  # QUOTA_GATEWAY_CONFIG in the Dockerfile
SECRET_KEYS = {"QG_ADMIN_TOKEN", "DATABASE_URL", "REDIS_URL"}
FINAL_FLUSH_S = 15  # startup.rs TASK_STOP: how long shutdown waits for the final replay/flush

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def duration_s(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for unit in ("ms", "s", "m", "h", "d"):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * units[unit]
    raise ValueError(f"not a duration: {text!r}")


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def load(directory):
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization.get("resources", []):
        path = directory / name
        if not path.exists():
            problem(f"{directory.name}/kustomization.yaml", f"resource {name} does not exist")
            continue
        docs += [(f"{directory.name}/{name}", d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def check_config(where, cm):
    data = cm.get("data", {})
    for key in ("gateway.toml", "plans.toml"):
        if key not in data:
            problem(where, f"ConfigMap {cm['metadata']['name']} has no {key}")
            return None
    gateway = tomllib.loads(data["gateway.toml"])
    tomllib.loads(data["plans.toml"])
    if gateway.get("api", {}).get("admin_token", ""):
        problem(where, "api.admin_token is set in the ConfigMap: it belongs in the Secret")
    for section in ("database", "redis"):
        url = gateway.get(section, {}).get("url", "")
        userinfo = url.split("://", 1)[-1].split("@", 1)[0] if "@" in url else ""
        if ":" in userinfo:
            problem(where, f"{section}.url carries a password in the ConfigMap: use the Secret")
    if BIN.exists():
        with tempfile.TemporaryDirectory() as tmp:
            for key in ("gateway.toml", "plans.toml"):
                pathlib.Path(tmp, key).write_text(data[key])
            env = {k: v for k, v in os.environ.items() if k not in SECRET_KEYS | {"QG_API_LISTEN"}}
            env["QG_ADMIN_TOKEN"] = "a-test-token-not-the-example"
            run = subprocess.run([str(BIN), "check-config", "--config", f"{tmp}/gateway.toml"],
                                 capture_output=True, text=True, env=env)
            if run.returncode != 0:
                problem(where, f"quota-gateway check-config refuses the ConfigMap:\n{run.stderr}")
    return gateway


def check_deployment(where, dep, configmaps, secrets, sidecar):
    spec = dep["spec"]
    pod = spec["template"]
    labels = pod["metadata"].get("labels", {})
    if not set(spec["selector"]["matchLabels"].items()) <= set(labels.items()):
        problem(where, "selector.matchLabels do not match the pod template's labels")
    containers = pod["spec"]["containers"]
    gateways = [c for c in containers if c.get("args", [None])[0] == "serve"]
    if len(gateways) != 1:
        problem(where, "expected one gateway container (args: [serve])")
        return
    gw = gateways[0]
    name = f"{where} container {gw['name']}"
    ports = {p["name"]: p["containerPort"] for p in gw.get("ports", [])}

    # Config: mounted where the image reads it, from a ConfigMap of this kustomization.
    mounts = {m["name"]: m["mountPath"] for m in gw.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    config = None
    for vname, path in mounts.items():
        cm_name = volumes.get(vname, {}).get("configMap", {}).get("name")
        if path == CONFIG_DIR and cm_name:
            if cm_name not in configmaps:
                problem(name, f"mounts ConfigMap {cm_name}, which this kustomization does not define")
            else:
                config = configmaps[cm_name]
    if config is None:
        problem(name, f"no ConfigMap mounted at {CONFIG_DIR}")
        return

    api_port = port_of(config["api"]["listen"])
    if ports.get("api") != api_port:
        problem(name, f"port `api` is {ports.get('api')}, the config listens on {api_port}")
    proxy = config.get("proxy")
    if proxy and ports.get("proxy") != port_of(proxy["listen"]):
        problem(name, f"port `proxy` is {ports.get('proxy')}, the config listens on {proxy['listen']}")

    # Probes: liveness is the process, readiness is Redis + Postgres.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = gw.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("api", api_port):
            problem(name, f"{probe} must GET {path} on the API port, is {get}")

    # Secrets only from the Secret.
    secret_refs = [e["secretRef"]["name"] for e in gw.get("envFrom", []) if "secretRef" in e]
    if not secret_refs:
        problem(name, "takes no environment from a Secret (admin token, database and Redis URLs)")
    for ref in secret_refs:
        if ref not in secrets:
            problem(name, f"Secret {ref} is not the example Secret's name")
        elif not SECRET_KEYS <= set(secrets[ref]):
            problem(name, f"Secret {ref} lacks {sorted(SECRET_KEYS - set(secrets[ref]))}")
    for e in gw.get("env", []):
        if e.get("name") in SECRET_KEYS and "value" in e:
            problem(name, f"{e['name']} is a literal value: take it from the Secret")

    # Resources.
    res = gw.get("resources", {})
    if not {"cpu", "memory"} <= set(res.get("requests", {})):
        problem(name, "resources.requests needs cpu and memory")
    if "memory" not in res.get("limits", {}):
        problem(name, "resources.limits needs memory")

    # Scrape annotations on the API port.
    ann = pod["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(api_port) \
            or ann.get("prometheus.io/path", "/metrics") != "/metrics":
        problem(where, f"pod annotations must let Prometheus scrape :{api_port}/metrics, are {ann}")

    # Shutdown: preStop, then the drain, then the final flush, inside the grace period.
    command = gw.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(command) != 2 or command[0] != "sleep" or not command[1].isdigit():
        problem(name, f"preStop must be a sleep, is {command}")
        return
    pre_stop = int(command[1])
    drain = duration_s(proxy.get("drain_timeout", "30s")) if proxy else 0
    api_drain = 30  # startup.rs API_DRAIN
    needed = pre_stop + max(drain, api_drain) + FINAL_FLUSH_S
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < needed:
        problem(where, f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain "
                       f"{max(drain, api_drain)} + final flush {FINAL_FLUSH_S} = {needed}")

    if sidecar:
        upstream = proxy["upstream"].split("://", 1)[1]
        host, port = upstream.rsplit(":", 1)
        if host not in ("127.0.0.1", "localhost"):
            problem(name, f"a sidecar proxies over loopback, not to {host}")
        others = [c for c in containers if c is not gw]
        if not any(port in " ".join(c.get("args", []) + c.get("command", []))
                   or any(str(p.get("containerPort")) == port for p in c.get("ports", []))
                   for c in others):
            problem(where, f"no other container of the pod serves the upstream port {port}")
        for c in others:
            cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if len(cmd) != 2 or not cmd[1].isdigit() or int(cmd[1]) < pre_stop + drain:
                problem(where, f"container {c['name']} must outlive the gateway's drain "
                               f"(preStop sleep >= {pre_stop + drain})")
    return ports


def main():
    secrets = {}
    for d in yaml.safe_load_all((HERE / "shared" / "secret.example.yaml").read_text()):
        if d and d["kind"] == "Secret":
            secrets[d["metadata"]["name"]] = d.get("stringData", {}) | d.get("data", {})
    checked = 0
    for directory in (HERE / "shared", HERE / "sidecar"):
        docs = load(directory)
        configmaps = {}
        for where, d in docs:
            if d["kind"] == "ConfigMap":
                cfg = check_config(where, d)
                if cfg is not None:
                    configmaps[d["metadata"]["name"]] = cfg
        deployments = {}
        for where, d in docs:
            if d["kind"] == "Deployment":
                ports = check_deployment(where, d, configmaps, secrets, directory.name == "sidecar")
                deployments[d["metadata"]["name"]] = (d, ports or {})
                checked += 1
        for where, d in docs:
            if d["kind"] != "Service":
                continue
            selector = set(d["spec"]["selector"].items())
            targets = [(dep, ports) for dep, ports in deployments.values()
                       if selector <= set(dep["spec"]["template"]["metadata"]["labels"].items())]
            if not targets:
                problem(where, "the Service selects no Deployment of this kustomization")
                continue
            all_ports = {name for c in targets[0][0]["spec"]["template"]["spec"]["containers"]
                         for name in (p["name"] for p in c.get("ports", []))}
            for p in d["spec"]["ports"]:
                if isinstance(p["targetPort"], str) and p["targetPort"] not in all_ports:
                    problem(where, f"targetPort {p['targetPort']} names no container port")
    if not BIN.exists():
        print(f"note: {BIN} not built; the ConfigMaps were not run through check-config")
    if problems:
        print("deploy/kubernetes:", len(problems), "problem(s)")
        for p in problems:
            print("  " + p)
        sys.exit(1)
    print(f"deploy/kubernetes: {checked} Deployments and their ConfigMaps, Services and Secret ok")


main()
