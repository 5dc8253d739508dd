# Sourced first by every launch example. `--help` (or -h) prints the script's usage, i.e. its header
# comment (what it launches, its variables) and that of the files it sources, and launches nothing;
# any other argument is refused, since the examples take their settings from environment variables
# only (an argument the script ignored would otherwise start the real job).
#   usage_or_refuse_arguments SCRIPT [SOURCED_FILE...] -- "$@"
# Also shell_words, how a dry run (DRY_RUN=1) prints a command.

# header_comment FILE: FILE's leading comment block, without the '#!' line and '#SBATCH' directives.
header_comment() {
    sed -n '1{/^#!/d};/^#SBATCH/d;/^#/!q;s/^# \{0,1\}//p' "$1"
}

usage_or_refuse_arguments() {
    local files=() arg
    while (($#)) && [[ "$1" != -- ]]; do files+=("$1"); shift; done
    shift
    for arg in "$@"; do
        case "$arg" in
            -h|--help)
                local f
                for f in "${files[@]}"; do
                    [[ "$f" == "${files[0]}" ]] || printf '\n%s:\n' "examples/$(basename "$f")"
                    header_comment "$f"
                done
                exit 0 ;;
        esac
    done
    if (($#)); then
        echo "error: $(basename "${files[0]}") takes no arguments (got: $*); its settings are environment" \
             "variables, e.g. LR=1e-3 bash ${files[0]}; --help lists them" >&2
        exit 2
    fi
}

# shell_words WORD...: WORDs on one line, each bare where that reads back as the same word after
# plain word splitting (letters, digits, / . , : = @ + - _), else quoted as printf %q does.
shell_words() {
    local word sep=""
    for word in "$@"; do
        if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./,:=@+-]+$ ]]; then
            printf '%s%s' "$sep" "$word"
        else
            printf '%s%q' "$sep" "$word"
        fi
        sep=" "
    done
    echo
}
