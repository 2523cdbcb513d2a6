"""xmlcompare: compare dbus/io.mcuflash1.xml with a running daemon's introspection.

The XML file in dbus/ is the API contract; the daemon's sd-bus vtables are
written by hand. compare() lists every difference between the two for the
io.mcuflash1.* interfaces: interfaces, methods (argument types and directions,
in order), properties (type and access) and signals (argument types, in order).
Argument names, annotations, doc comments and member order are not compared,
and standard org.freedesktop.DBus.* interfaces are ignored. It does not talk to
a bus: the caller passes the introspection text (e.g. from busctl introspect
--xml-interface, or Introspect() through python3-dbus).

    from xmlcompare import compare
    diffs = compare("dbus/io.mcuflash1.xml", [manager_xml, mcu_xml])
    assert not diffs, "\n".join(diffs)

Run as a script: xmlcompare.py CONTRACT.xml LIVE.xml... prints the differences
and exits 1 if there are any.
"""

import sys
import xml.etree.ElementTree as ET

PREFIX = "io.mcuflash1."


def _interfaces(xml_text):
    """Map interface name -> {"method"|"property"|"signal": {member: description}}."""
    root = ET.fromstring(xml_text)
    interfaces = {}
    # Interfaces of the object itself; child <node> elements are other objects.
    for iface in root.findall("interface"):
        name = iface.get("name", "")
        if not name.startswith(PREFIX):
            continue
        members = {"method": {}, "property": {}, "signal": {}}
        for method in iface.findall("method"):
            members["method"][method.get("name")] = tuple(
                (arg.get("direction", "in"), arg.get("type"))
                for arg in method.findall("arg"))
        for prop in iface.findall("property"):
            members["property"][prop.get("name")] = (prop.get("type"), prop.get("access"))
        for signal in iface.findall("signal"):
            members["signal"][signal.get("name")] = tuple(
                arg.get("type") for arg in signal.findall("arg"))
        interfaces[name] = members
    return interfaces


def _describe(kind, value):
    if kind == "method":
        if not value:
            return "no arguments"
        return ", ".join(f"{direction} {signature}" for direction, signature in value)
    if kind == "property":
        return f"type {value[0]}, access {value[1]}"
    return "arguments (" + ", ".join(value) + ")"


def compare(xml_path, introspection_xml_text, require_all=False):
    """Return a list of differences (strings; empty if the API matches).

    xml_path: the contract, dbus/io.mcuflash1.xml.
    introspection_xml_text: the introspection XML of one object, or a list of
      them (e.g. /io/mcuflash1 and one MCU object) whose interfaces are merged.
    require_all: also report io.mcuflash1.* interfaces of the contract that
      none of the given objects implements. By default only the interfaces the
      objects implement are compared, plus any they implement that the
      contract lacks.
    """
    with open(xml_path, encoding="utf-8") as f:
        contract = _interfaces(f.read())

    texts = introspection_xml_text
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    live = {}
    differences = []
    for text in texts:
        for name, members in _interfaces(text).items():
            if name not in live:
                live[name] = members
            elif live[name] != members:
                differences.append(f"{name}: the given objects introspect it differently")

    for name in sorted(set(contract) | set(live)):
        if name not in live:
            if require_all:
                differences.append(f"{name}: in {xml_path} but not implemented by the daemon")
            continue
        if name not in contract:
            differences.append(f"{name}: implemented by the daemon but not in {xml_path}")
            continue
        for kind in ("method", "property", "signal"):
            want, have = contract[name][kind], live[name][kind]
            for member in sorted(set(want) | set(have)):
                if member not in have:
                    differences.append(f"{name}: {kind} {member} is in {xml_path} "
                                       f"but not in the daemon")
                elif member not in want:
                    differences.append(f"{name}: {kind} {member} is in the daemon "
                                       f"but not in {xml_path}")
                elif want[member] != have[member]:
                    differences.append(f"{name}: {kind} {member}: {xml_path} has "
                                       f"{_describe(kind, want[member])}, the daemon has "
                                       f"{_describe(kind, have[member])}")
    return differences


def main(argv):
    if len(argv) < 3:
        print(f"usage: {argv[0]} CONTRACT.xml LIVE.xml...", file=sys.stderr)
        return 2
    texts = []
    for path in argv[2:]:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    differences = compare(argv[1], texts)
    for line in differences:
        print(line)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
