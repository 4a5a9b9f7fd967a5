"""The file names the commands write into their output folders (torch-free: the methods check their own state
files against them, the CLI reads them)."""

COMMAND_FILE = "command.json"
PURIFY_OUTPUTS = ("purified.safetensors", "purified.pt", "masks.txt", "report.json", "sweep.csv",
                  "mask_histograms.png", "pruning_sweep.png")
ATTACK_OUTPUTS = ("backdoored.safetensors", "backdoored.pt", "attack.json")
