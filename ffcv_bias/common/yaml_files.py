"""Every YAML file the project reads (config files, sweep files) is read here, strictly.

PyYAML on its own keeps the last of two equal keys without a word: `training: {epochs: 2,
epochs: 3}` trains 3 epochs, and a second `grid:` in a sweep file silently drops the first.
`load_yaml_file` refuses a repeated key, naming it and both lines, and turns a syntax
error (a tab, an unclosed bracket) into one line that starts `FILE:LINE:COLUMN:` as
compilers do, so an editor can jump to it:

    content = load_yaml_file("cfg.yaml", "config file")   # raises YamlFileError
    # cfg.yaml:3:3: duplicate key 'training.epochs' in config file (lines 2 and 3): ...

Reading the file (not found, a directory, not text) stays the caller's to report: its
OSError or UnicodeDecodeError passes through.
"""
import yaml

# libyaml's parser when present (a sweep resolves its base config once per run); the
# duplicate check and the constructors are Python either way.
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileError(ValueError):
    """A YAML file that does not parse or repeats a key: one line, `FILE:LINE:COL: ...`."""


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first_mark, second_mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first_mark, self.second_mark = key, first_mark, second_mark


class StrictSafeLoader(_BASE_LOADER):
    """yaml's safe loader that refuses a key given twice in one mapping (merge keys `<<`
    aside: overriding a merged key is what they are for)."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        check_unique_keys(node)
        return self.construct_document(node)


def check_unique_keys(node, path=(), seen=None):
    """Raise DuplicateKeyError for the first mapping of `node`'s tree holding a key twice;
    the key is named by its path from the document's root ('training.epochs')."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: checked where its anchor was
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if name is not None:
                key = (key_node.tag, name)
                if key in first:
                    raise DuplicateKeyError(".".join(path + (name,)), first[key],
                                            key_node.start_mark)
                first[key] = key_node.start_mark
            check_unique_keys(value_node, path + ((name if name is not None else "?"),),
                              seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            parent = path[:-1] + (f"{path[-1]}[{index}]",) if path else (f"[{index}]",)
            check_unique_keys(item, parent, seen)


def loads(text, name="<string>", what="YAML"):
    """The content of YAML `text` (`name`: the file it came from, for messages)."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)
    except DuplicateKeyError as error:
        first, second = error.first_mark.line + 1, error.second_mark.line + 1
        where = f"lines {first} and {second}" if first != second else f"twice on line {first}"
        raise YamlFileError(
            f"{name}:{second}:{error.second_mark.column + 1}: duplicate key {error.key!r} in "
            f"{what} ({where}): YAML would silently keep only the last; give each key "
            f"once") from None
    except yaml.YAMLError as error:
        raise YamlFileError(syntax_error_line(error, text, name, what)) from None


def load_yaml_file(path, what="YAML file"):
    """The content of the YAML file `path` (None when empty); raises YamlFileError naming
    the file, line and column of a syntax error or a repeated key. Reading errors
    (OSError, UnicodeDecodeError) are the caller's."""
    with open(path) as handle:
        text = handle.read()
    return loads(text, str(path), what)


def syntax_error_line(error, text, name, what):
    """`FILE:LINE:COL: <what> is not valid YAML: <problem> (<context> at line N)`."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None and isinstance(error, yaml.reader.ReaderError):
        # A byte or character YAML does not allow (a NUL, a control character).
        before = text[:error.position] if isinstance(text, str) else ""
        line, column = before.count("\n"), len(before) - (before.rfind("\n") + 1)
        reason = str(error).splitlines()[0]  # 'unacceptable character #x0000: ...'
        return f"{name}:{line + 1}:{column + 1}: {what} is not valid YAML: {reason}"
    if mark is None or not problem:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        return f"{name}: {what} is not valid YAML: {first_line}"
    message = f"{name}:{mark.line + 1}:{mark.column + 1}: {what} is not valid YAML: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        message += f" ({context} at line {context_mark.line + 1})"
    if _character_at(text, mark) == "\t":
        message += "; that is a tab: YAML indents with spaces"
    return message


def _character_at(text, mark):
    lines = text.splitlines() if isinstance(text, str) else []
    if mark.line < len(lines) and mark.column < len(lines[mark.line]):
        return lines[mark.line][mark.column]
    return None
